"""One learner config: node parameters, verb flags and YAML come from LearnerConfig's defaults,
and the learner's delta is safety's delta."""

from __future__ import annotations

import argparse
import dataclasses

import yaml

from vlarl.core.safety import SafetyConfig
from vlarl.graph import config_path
from vlarl.learning.learner import LearnerConfig
from vlarl.learning.residual_rl import AgentConfig
from vlarl.learning.runs import flat_values


def test_every_learner_parameter_default_is_the_config_default() -> None:
    from vlarl.nodes.learner import PARAMS, learner_config

    defaults = flat_values(LearnerConfig())
    params = {p.name: p for p in PARAMS}
    shared = set(defaults) & set(params)
    # Every learning setting is a parameter, except what the base model decides.
    assert set(defaults) - shared == {"obs_dim", "action_dim", "residual"}
    for name in shared:
        assert params[name].default == defaults[name], name
        assert params[name].check(defaults[name]) is None, name
    # The parameters' defaults build exactly the default config.
    assert learner_config({p.name: p.default for p in PARAMS}) == LearnerConfig()


def test_learner_yaml_sets_no_learning_setting_against_the_config() -> None:
    from vlarl.nodes.learner import PARAMS

    values = yaml.safe_load(config_path("learner.yaml").read_text())["learner"]["ros__parameters"]
    params = {p.name: p for p in PARAMS}
    defaults = flat_values(LearnerConfig())
    for name, value in values.items():
        assert name in params, f"config/learner.yaml sets undeclared {name}"
        assert params[name].check(value) is None, name
        if name in defaults:
            assert value == defaults[name], f"config/learner.yaml disagrees on {name}"
    assert "delta" not in values  # safety's delta, checked at start


def test_learner_delta_is_safety_delta() -> None:
    safety_yaml = yaml.safe_load(config_path("safety.yaml").read_text())
    yaml_delta = safety_yaml["safety"]["ros__parameters"]["delta"]
    assert AgentConfig().delta == SafetyConfig().delta == yaml_delta
    assert LearnerConfig().agent.delta == SafetyConfig().delta


def test_verb_flags_default_to_the_config() -> None:
    from vlarl.learning.runs import config_from_args
    from vlarl.learning.train_residual import TrainResidualConfig, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = config_from_args(TrainResidualConfig, parser.parse_args([]))
    assert parsed == TrainResidualConfig()
    assert parsed.learner == LearnerConfig()
    changed = config_from_args(TrainResidualConfig, parser.parse_args(["--utd", "3"]))
    assert dataclasses.replace(changed.learner, utd=2) == LearnerConfig()
