"""learner node: replay shards (from the bag bridge) -> residual SAC/RLPD -> policy_weights.

A thin adapter over :class:`vlarl.learning.learner.ResidualLearner`. A worker thread ingests
the shards the bridge writes into ``replay_dir``, runs ``utd`` updates per new transition and
proposes a candidate every ``publish_every`` updates; the critic only pre-screens it. Blobs go
out on ``policy_weights`` (std_msgs/UInt8MultiArray; reliable, transient local, so a policy node
that starts later still gets the newest one). It checkpoints before every blob it publishes and
on shutdown; restarted on the same ``checkpoint`` and ``replay_dir`` it resumes and re-publishes
the deployed version.

Deployment (``gate``):

- ``rollouts`` (the default): this node runs the deployment gate over the graph
  (:class:`vlarl.learning.graph_gate.GraphGate`, the rule of
  :class:`vlarl.learning.gate.DeploymentGate`). It owns the policy node's ``residual_version``
  (``policy_node``'s ``set_parameters`` service): it pins the deployed version, publishes a
  candidate's blob (the policy checks and loads it, the deployed version keeps acting), then at
  each episode end (``reward/episode``) pins the arm that acts in the next episode. Outcomes are
  the episodes it ingests from the replay whose acting tag is the candidate's or the deployed
  version's (success: the episode's success flag). Every verdict is published on ``learner/gate``
  (std_msgs/String JSON; reliable, transient local) and recorded; a promoted candidate is persisted
  and stays pinned, a refused one is dropped (the deployed version stays pinned and its blob is
  published again, so a restarted policy node gets it) and learning goes on. A policy node whose
  ``set_parameters`` does not answer gets no candidate (fail closed; ``learner/status`` says why).
- ``none``: every candidate that passes the pre-screen is deployed and published at once, and
  the policy (``residual_version`` = -1) follows it.

One version, one blob, across crashes: an accepted candidate's blob is persisted (``<checkpoint
stem>.deployed.safetensors``, atomic + fsync), then the checkpoint is saved, and only then is the
blob published. On start, a persisted deployed blob is re-published byte for byte and its version
counts as spent even when the checkpoint is older (killed between the two writes), so the next
candidate gets a higher version.

Base swaps (:class:`vlarl.learning.base_follow.BaseFollower`): the learner follows the base the
policy runs (``model`` and ``path`` in ``policy/status``). Another base's file is loaded and
checked (its tag, the learner's obs/action dims, the task); then the current learner saves its
checkpoint and the learner of the new base starts: resumed from that base's checkpoint (a
rollback; ``<checkpoint stem>.<model_id>@<version>.safetensors`` for every base but the start-up
one, whose checkpoint is ``checkpoint``), else fresh. It learns only from episodes acted on its
base, and its versions continue the one sequence across bases. The gate starts over for the new
base (deployed = the zero residual; a running trial is abandoned without a verdict). A file that
fails the checks is refused (``base_switch`` in ``learner/status``): the learner stays on its
base, and that tag and path are not checked again until the policy reports another.

It needs no simulator and no robot: it can run on another machine of the same ROS 2 network,
reading a replay folder the bridge fills there.
"""

from __future__ import annotations

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from rcl_interfaces.srv import GetParameters, SetParameters  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from std_msgs.msg import String, UInt8MultiArray  # noqa: E402

from vlarl import topics  # noqa: E402
from vlarl.contract import ContractError  # noqa: E402
from vlarl.core.onnx_policy import OnnxPolicy  # noqa: E402
from vlarl.core.weights import WeightError, decode_residual  # noqa: E402
from vlarl.data.replay import atomic_write_bytes  # noqa: E402
from vlarl.graph import resolve_model_path  # noqa: E402
from vlarl.learning.base_follow import BaseFollower  # noqa: E402
from vlarl.learning.errors import LearningError  # noqa: E402
from vlarl.learning.gate import GateConfig, Verdict  # noqa: E402
from vlarl.learning.graph_gate import (  # noqa: E402
    GRAPH_GATES,
    IDLE,
    PINNING,
    Action,
    GraphGate,
    GraphGateConfig,
    Pin,
)
from vlarl.learning.learner import (  # noqa: E402
    PRESCREENS,
    Candidate,
    LearnerConfig,
    ResidualLearner,
)
from vlarl.learning.residual_rl import AgentConfig  # noqa: E402
from vlarl.learning.runs import flat_fields  # noqa: E402
from vlarl.ros.params import Param, declare, params_from_config  # noqa: E402

WEIGHTS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
# Verdicts are rare and each one matters: a late subscriber gets the last few.
GATE_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=20,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)

# Settings that change how the agent is built (or what it is) cannot change while it runs.
_BUILD = (*(f.name for f in fields(AgentConfig)), "nstep", "normalize_obs", "model_id", "seed")
PARAMS: tuple[Param, ...] = (
    Param(
        "base_model",
        "models/pick-place-v3-student.onnx",
        "the frozen base policy the residual corrects (its tag goes into every blob)",
        read_only=True,
    ),
    Param(
        "task",
        "",
        "task the residual is learned on; the base must know it ('' = not checked)",
        read_only=True,
    ),
    Param("replay_dir", "replay/live", "replay folder the bag bridge writes", read_only=True),
    Param(
        "checkpoint",
        "runs/learner/learner.safetensors",
        "learner checkpoint (resumed from when it exists)",
        read_only=True,
    ),
    # The learner core's settings: built from LearnerConfig, so their defaults are its defaults.
    *params_from_config(
        LearnerConfig,
        read_only=(*_BUILD, "delta"),
        bounds={
            "delta": (0.0, 1.0),
            "utd": (1, 64),
            "critics": (2, 64),
            "critic_subset": (1, 64),
            "hidden": (8, 4096),
            "batch_size": (2, 65536),
            "gamma": (0.0, 1.0),
            "tau": (0.0, 1.0),
            "nstep": (1, 64),
            "publish_every": (1, 10**9),
            "prescreen_states": (1, 10**7),
            "target_entropy": (-100.0, 100.0),
            "prescreen_tolerance": (-1e6, 1e6),
            "seed": (0, 2**31 - 1),
        },
        choices={"prescreen": PRESCREENS},
        exclude=("obs_dim", "action_dim", "residual"),
    ),
    Param("safety_node", "/safety", "safety node whose delta must equal ours", read_only=True),
    Param(
        "safety_check_timeout_s",
        10.0,
        "how long to wait at start for safety's delta; no blob is published before it matched",
        low=0.1,
        high=600.0,
        read_only=True,
    ),
    # The deployment gate's settings: built from GraphGateConfig (its rule is GateConfig's).
    *params_from_config(
        GraphGateConfig,
        read_only=tuple(flat_fields(GraphGateConfig)),
        bounds={
            "confidence": (0.5, 1.0),
            "min_episodes": (1, 10**6),
            "look_every": (1, 10**6),
            "max_episodes": (1, 10**6),
            "margin": (0.0, 1.0),
            "gate_min_share": (0.5, 1.0),
        },
        choices={"gate": GRAPH_GATES},
    ),
    Param(
        "policy_node",
        "/policy",
        "policy node whose residual_version the gate pins (gate rollouts)",
        read_only=True,
    ),
    Param(
        "policy_timeout_s",
        5.0,
        "how long the policy node may take to answer a residual_version change (gate rollouts)",
        low=0.1,
        high=600.0,
        read_only=True,
    ),
    Param("poll_period_s", 0.5, "how often the replay folder is polled", low=0.01, high=60.0),
    Param("status_rate_hz", 1.0, "rate of learner/status", low=0.1, high=50.0),
    Param("threads", 1, "torch threads", low=1, high=64, read_only=True),
)
PARAMS_BY_NAME = {p.name: p for p in PARAMS}


def learner_config(values: dict[str, Any]) -> LearnerConfig:
    """The :class:`LearnerConfig` the node's parameter values describe."""
    agent_names = {f.name for f in fields(AgentConfig)}
    agent = AgentConfig(**{k: v for k, v in values.items() if k in agent_names})
    names = {f.name for f in fields(LearnerConfig)} - {"agent"}
    return LearnerConfig(agent=agent, **{k: v for k, v in values.items() if k in names})


def gate_config(values: dict[str, Any]) -> GraphGateConfig:
    """The :class:`GraphGateConfig` the node's parameter values describe."""
    rule = GateConfig(**{f.name: values[f.name] for f in fields(GateConfig)})
    return GraphGateConfig(
        gate=str(values["gate"]), rule=rule, gate_min_share=float(values["gate_min_share"])
    )


class LearnerNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("learner", **kwargs)
        self._p = declare(self, PARAMS, self._on_change)
        import torch

        torch.set_num_threads(int(self._p["threads"]))
        path = resolve_model_path(str(self._p["base_model"]))
        try:
            base = OnnxPolicy.load(path, providers="cpu").metadata
        except ContractError as exc:
            raise ValueError(f"base_model {path}: {exc}") from None
        task = str(self._p["task"])
        if task and task not in base.tasks:
            raise ValueError(
                f"base_model {path.name} does not know task {task!r} "
                f"(its tasks: {', '.join(base.tasks)})"
            )
        try:
            config = learner_config(self._p)
            # One learner per base the policy runs (the start-up base's first).
            self.follower = BaseFollower(
                config,
                base=base,
                checkpoint=str(self._p["checkpoint"]),
                replay_dir=str(self._p["replay_dir"]),
                task=task,
            )
            gating = gate_config(self._p)
        except LearningError as exc:
            raise ValueError(str(exc)) from None
        checkpoint = Path(str(self._p["checkpoint"]))
        self._gating = gating
        self._generation = 0  # bumped by every base switch (the worker starts over)
        self._refused_base: tuple[str, str] | None = None  # (tag, path) refused last
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.delta_check = "pending"  # pending | ok | "mismatch: ..." (then nothing is published)
        self._params_client: Any = self.create_client(
            GetParameters, f"{str(self._p['safety_node']).rstrip('/')}/get_parameters"
        )
        self._weights_pub = self.create_publisher(
            UInt8MultiArray, topics.POLICY_WEIGHTS, WEIGHTS_QOS
        )
        self._status_pub = self.create_publisher(String, topics.LEARNER_STATUS, 10)
        # The gate (None: gate none). Its state is touched by the worker (episodes, proposals)
        # and the executor (policy status, episode ends, pin answers): under _gate_lock.
        self.gate: GraphGate | None = None
        self._gate_lock = threading.RLock()
        self._trial: Candidate | None = None
        self._policy_status: dict[str, Any] = {}
        self._pin_future: Any = None
        self._pin_sent = 0.0
        # The base the policy runs is followed in every gate mode.
        self.create_subscription(String, topics.POLICY_STATUS, self._on_policy_status, 10)
        if gating.gate == "rollouts":
            self.gate = self._new_gate(base.tag, self.learner.state.deployed_version)
            self._policy_node = str(self._p["policy_node"]).rstrip("/")
            self._pin_client: Any = self.create_client(
                SetParameters, f"{self._policy_node}/set_parameters"
            )
            self._gate_pub = self.create_publisher(String, topics.LEARNER_GATE, GATE_QOS)
            self.create_subscription(String, topics.EPISODE, self._on_episode_end, 50)
            self.create_timer(0.2, self._check_pin_timeout)
        self.create_timer(1.0 / float(self._p["status_rate_hz"]), self._publish_status)
        self.get_logger().info(
            f"learner for {base.tag}: replay {self._p['replay_dir']}, checkpoint "
            f"{checkpoint} ({'resumed' if self.learner.resumed else 'new'}), delta "
            f"{config.agent.delta}"
        )
        self._worker = threading.Thread(target=self._work, name="learner", daemon=True)
        self._worker.start()

    @property
    def learner(self) -> ResidualLearner:
        """The learner of the base the policy runs (it changes only under ``_lock``)."""
        return self.follower.learner

    @property
    def _deployed_path(self) -> Path:
        """The current learner's deployed blob (``<its checkpoint stem>.deployed...``)."""
        checkpoint = self.learner.checkpoint
        assert checkpoint is not None
        return checkpoint.with_suffix(".deployed.safetensors")

    def _new_gate(self, base_tag: str, deployed_version: int) -> GraphGate:
        return GraphGate(
            self._gating.rule,
            base_tag=base_tag,
            model_id=self.follower.config.model_id,
            deployed_version=deployed_version,
            min_share=self._gating.gate_min_share,
        )

    def _on_change(self, changes: dict[str, Any]) -> str | None:
        if hasattr(self, "learner"):
            with self._lock:
                cfg = self.learner.config
                for key, value in changes.items():
                    if hasattr(cfg, key):
                        setattr(cfg, key, value)
        return None

    # ------------------------------------------------------------------ start-up checks
    def _check_safety_delta(self) -> bool:
        """Ask the safety node for its delta; True once it is known to equal ours."""
        if self.delta_check == "ok":
            return True
        if self.delta_check.startswith("mismatch"):
            return False
        timeout = float(self._p["safety_check_timeout_s"])
        if not self._params_client.wait_for_service(timeout_sec=timeout):
            self.get_logger().warning(
                f"{self._p['safety_node']} does not answer: its delta is unchecked, "
                "nothing is published until it is",
                throttle_duration_sec=30.0,
            )
            return False
        future = self._params_client.call_async(GetParameters.Request(names=["delta"]))
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.02)
        result = future.result() if future.done() else None
        if result is None or not result.values:
            return False
        theirs = float(result.values[0].double_value)
        ours = float(self.learner.config.agent.delta)
        if abs(theirs - ours) > 1e-9:
            self.delta_check = (
                f"mismatch: safety's delta is {theirs}, the learner's {ours}; set both from "
                "one value (config/safety.yaml) and restart the learner"
            )
            self.get_logger().error(self.delta_check + "; no residual will be published")
            return False
        self.delta_check = "ok"
        return True

    # ------------------------------------------------------------------ publishing
    def _republish_deployed(self) -> None:
        try:
            blob = self._deployed_path.read_bytes()
            weights = decode_residual(blob)
        except (OSError, WeightError) as exc:
            self.get_logger().warning(f"no deployed version to re-publish: {exc}")
            return
        if weights.model_id != self.learner.config.model_id:
            self.get_logger().warning(
                f"{self._deployed_path} holds {weights.tag}, not a {self.learner.config.model_id} "
                "version: not re-published"
            )
            return
        with self._lock:
            self.learner.deployed_layers = [(w.copy(), b.copy()) for w, b in weights.layers]
            self.learner.deployed_scale = weights.scale
            # A version number once published is never minted again, even if the checkpoint
            # is older than the deployed blob (a crash between the two writes).
            state = self.learner.state
            state.version = max(state.version, weights.version)
            state.deployed_version = weights.version
        with self._gate_lock:
            if self.gate is not None and self.gate.phase == IDLE:
                self.gate.set_deployed(weights.version)
        self._publish_blob(blob)
        self.get_logger().info(f"re-published deployed {weights.tag}")

    def _publish_blob(self, blob: bytes) -> None:
        msg = UInt8MultiArray()
        msg.data = blob  # bytes are accepted for uint8[] fields
        self._weights_pub.publish(msg)

    def _work(self) -> None:
        checked = self._check_safety_delta()
        if checked and self.learner.resumed:
            self._republish_deployed()
        generation, last_propose = -1, 0
        while not self._stop.is_set():
            with self._lock:
                learner = self.learner
                if generation != self._generation:  # started, or another base's learner
                    generation, last_propose = self._generation, learner.agent.updates
                added = learner.ingest()
                outcomes = learner.take_outcomes()
                ran = learner.train(max_updates=50)
            if self.gate is not None and outcomes:
                with self._gate_lock:
                    actions = [a for o in outcomes for a in self.gate.on_episode(o)]
                self._run_actions(actions)
            if learner.agent.updates - last_propose >= learner.config.publish_every:
                if not checked:
                    checked = self._check_safety_delta()
                    if checked and self._deployed_path.exists():
                        self._republish_deployed()
                if checked and self.gate is None:
                    last_propose = learner.agent.updates
                    self._propose_and_publish()
                elif checked and self._propose_for_trial():
                    last_propose = learner.agent.updates
            if not added and not ran:
                self._stop.wait(float(self._p["poll_period_s"]))

    def _propose_and_publish(self) -> None:
        with self._lock:
            learner = self.learner
            candidate = learner.propose()
            if candidate is None:
                return
            if candidate.blob is None:
                self.get_logger().info(
                    f"pre-screen refused candidate {candidate.version}: estimate "
                    f"{candidate.estimate:.3f} < deployed {candidate.deployed_estimate:.3f}"
                )
                return
            learner.promote(candidate)
            # Persist before publishing: the blob first, then the checkpoint; a restart
            # re-publishes that blob and never mints its version again.
            atomic_write_bytes(self._deployed_path, candidate.blob, overwrite=True)
            learner.save()
            # Under the lock: a base switch cannot come between (no blob of a base left behind).
            self._publish_blob(candidate.blob)
        self.get_logger().info(
            f"published {learner.config.model_id}@{candidate.version} (parent "
            f"{candidate.parent}, estimate {candidate.estimate:.3f} vs deployed "
            f"{candidate.deployed_estimate:.3f}, {learner.state.env_steps} steps)"
        )

    # ------------------------------------------------------------------ the deployment gate
    def _gate_blocked(self) -> str | None:
        """Why no trial may start now (None: one may)."""
        assert self.gate is not None
        if not self._pin_client.service_is_ready():
            return (
                f"{self._policy_node}/set_parameters is not reachable: no candidate is "
                "published while the deployed version cannot be pinned"
            )
        with self._gate_lock:
            return self.gate.blocked()

    def _propose_for_trial(self) -> bool:
        """Propose a candidate and start its trial: pin the deployed version, then publish.
        False when the gate cannot take a candidate now (it is proposed once it can)."""
        gate = self.gate
        assert gate is not None
        reason = self._gate_blocked()
        if reason is not None:
            with self._gate_lock:
                if gate.phase == IDLE:
                    gate.note = reason
            self.get_logger().info(f"no candidate proposed: {reason}", throttle_duration_sec=30.0)
            return False
        with self._lock:
            learner = self.learner
            candidate = learner.propose()
            if candidate is None:
                return True
            if candidate.blob is None:
                self.get_logger().info(
                    f"pre-screen refused candidate {candidate.version}: estimate "
                    f"{candidate.estimate:.3f} < deployed {candidate.deployed_estimate:.3f}"
                )
                return True
            # The version is spent before its blob leaves: a restart never mints it again.
            learner.save()
        with self._gate_lock:
            pin = gate.begin(candidate.version)
        error = self._pin_now(pin)
        with self._gate_lock:
            if gate is not self.gate:  # the base was switched meanwhile: that gate is gone
                self.get_logger().info(
                    f"candidate {candidate.version} not published: the base changed to "
                    f"{self.gate.base_tag if self.gate else '?'} while it was pinned"
                )
                return True
            actions = gate.pin_done(pin.version, error)
            if gate.phase != PINNING or gate.pin != pin.version:
                if gate.phase == PINNING:
                    gate.cancel(f"the deployed version is not pinned: {error or 'unknown'}")
                self.get_logger().warning(
                    f"candidate {candidate.version} not published: {gate.note}"
                )
                published = False
            else:
                gate.published(int(self._policy_status.get("weights_refused", 0)))
                self._trial = candidate
                published = True
        if published:
            assert candidate.blob is not None
            self._publish_blob(candidate.blob)
            self.get_logger().info(
                f"trial of {gate.tag_of(candidate.version)} against deployed "
                f"{gate.tag_of(gate.deployed_version)}: blob published, the deployed version "
                f"stays pinned until the policy has loaded it (estimate {candidate.estimate:.3f} "
                f"vs {candidate.deployed_estimate:.3f})"
            )
        self._run_actions(actions)
        return True

    def _pin_now(self, pin: Pin) -> str:
        """Set the policy's residual_version and wait for the answer ('' = taken)."""
        future = self._pin_client.call_async(self._pin_request(pin.version))
        deadline = time.monotonic() + float(self._p["policy_timeout_s"])
        while not future.done() and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.01)
        if not future.done():
            self._pin_client.remove_pending_request(future)
            return f"no answer from {self._policy_node} in {self._p['policy_timeout_s']} s"
        return self._pin_answer(future)

    @staticmethod
    def _pin_request(version: int) -> Any:
        request = SetParameters.Request()
        request.parameters = [Parameter("residual_version", value=version).to_parameter_msg()]
        return request

    @staticmethod
    def _pin_answer(future: Any) -> str:
        try:
            result = future.result()
        except Exception as exc:  # a failed call: report it as the refusal
            return f"set_parameters failed: {exc}"
        if result is None or not result.results:
            return "set_parameters gave no result"
        answer = result.results[0]
        return "" if answer.successful else (answer.reason or "refused without a reason")

    def _send_pin(self, pin: Pin) -> None:
        """Set the policy's residual_version without waiting (the answer comes back later)."""
        self.get_logger().info(f"residual_version={pin.version}: {pin.why}")
        gate = self.gate
        assert gate is not None
        if not self._pin_client.service_is_ready():
            with self._gate_lock:
                actions = gate.pin_done(pin.version, "set_parameters is not reachable")
            self._run_actions(actions)
            return
        future = self._pin_client.call_async(self._pin_request(pin.version))
        with self._gate_lock:
            self._pin_future, self._pin_sent = future, time.monotonic()
        future.add_done_callback(lambda f: self._on_pin_answer(pin.version, f))

    def _on_pin_answer(self, version: int, future: Any) -> None:
        error = self._pin_answer(future)
        if error:
            self.get_logger().warning(
                f"the policy did not take residual_version={version}: {error}"
            )
        with self._gate_lock:
            if self._pin_future is future:
                self._pin_future = None
            actions = self.gate.pin_done(version, error) if self.gate is not None else []
        self._run_actions(actions)

    def _check_pin_timeout(self) -> None:
        with self._gate_lock:
            future, gate = self._pin_future, self.gate
            late = future is not None and (
                time.monotonic() - self._pin_sent > float(self._p["policy_timeout_s"])
            )
            if not late or gate is None or gate.pending is None:
                return
            self._pin_future = None
            version = gate.pending
            self._pin_client.remove_pending_request(future)
            actions = gate.pin_done(version, f"no answer in {self._p['policy_timeout_s']} s")
        self._run_actions(actions)

    def _on_policy_status(self, msg: String) -> None:
        try:
            status = json.loads(msg.data)
        except ValueError:
            return
        if not isinstance(status, dict):
            return
        self._follow_base(status)
        if self.gate is None:
            return
        with self._gate_lock:
            self._policy_status = status
            actions = self.gate.policy_status(status) if self.gate is not None else []
        self._run_actions(actions)

    def _follow_base(self, status: dict[str, Any]) -> None:
        """Switch to the residual learner of the base the policy reports, if it is another."""
        tag, where = status.get("model"), status.get("path")
        if not isinstance(tag, str) or not isinstance(where, str):
            return
        follower = self.follower
        if not follower.wants_switch(tag) or self._refused_base == (tag, where):
            return
        try:
            # Loaded and checked outside the lock: the worker and the status go on meanwhile.
            meta = follower.check(tag, resolve_model_path(where))
        except LearningError as exc:
            self._refuse_base(tag, where, str(exc))
            return
        with self._lock, self._gate_lock:
            try:
                switch = follower.switch(meta)
            except LearningError as exc:
                refusal: str | None = str(exc)
            else:
                refusal = None
                self._generation += 1
                self._refused_base = None
                # The gate starts over on the new base: the policy dropped the old base's
                # residual, so the zero residual is deployed; a running trial is abandoned
                # (no verdict: nothing was decided) and a pin in flight is forgotten.
                self._trial = None
                self._pin_future = None
                if self.gate is not None:
                    self.gate = self._new_gate(meta.tag, 0)
                    self.gate.note = f"started over on base {meta.tag}"
        if refusal is not None:
            self._refuse_base(tag, where, refusal)
            return
        self.get_logger().info(
            f"{switch.describe()} (version {self.learner.state.version}, "
            f"{self.learner.agent.updates} updates)"
        )

    def _refuse_base(self, tag: str, where: str, reason: str) -> None:
        with self._lock:
            self.follower.refuse(reason)
            self._refused_base = (tag, where)
        self.get_logger().error(
            f"{reason}: the learner stays on {self.follower.base_tag} and publishes nothing "
            f"for {tag}"
        )

    def _on_episode_end(self, msg: String) -> None:
        with self._gate_lock:
            actions = self.gate.on_boundary() if self.gate is not None else []
        self._run_actions(actions)

    def _run_actions(self, actions: Sequence[Action]) -> None:
        """Carry out the gate's actions in order (a verdict before the pin that follows it)."""
        for action in actions:
            if isinstance(action, Pin):
                self._send_pin(action)
            else:
                self._on_verdict(action)

    def _on_verdict(self, verdict: Verdict) -> None:
        with self._gate_lock:
            gate = self.gate
            if gate is not None and not verdict.candidate.startswith(f"{gate.base_tag}+"):
                # Decided by the gate of a base switched away from: that trial was abandoned.
                self.get_logger().info(f"verdict on {verdict.candidate} dropped: base switched")
                return
            candidate, self._trial = self._trial, None
        learner = self.learner
        if verdict.accepted:
            assert candidate is not None and candidate.blob is not None
            with self._lock:
                learner.promote(candidate, verdict=verdict.as_dict())
                # Persisted before it is pinned: the blob first, then the checkpoint.
                atomic_write_bytes(self._deployed_path, candidate.blob, overwrite=True)
                learner.save()
        elif self._deployed_path.exists():
            # The refused candidate's blob is the one its publisher keeps for late joiners: the
            # deployed blob goes out again, so a restarted policy node gets that one.
            try:
                self._publish_blob(self._deployed_path.read_bytes())
            except OSError as exc:
                self.get_logger().warning(f"deployed blob not re-published: {exc}")
        record = {**verdict.as_dict(), "env_steps": learner.state.env_steps}
        if candidate is not None:
            record |= {"estimate": candidate.estimate, "version": candidate.version}
        self._gate_pub.publish(String(data=json.dumps(record, default=float)))
        log = self.get_logger().info if verdict.accepted else self.get_logger().warning
        log(
            f"gate: {verdict.candidate} {'promoted' if verdict.accepted else 'refused'} "
            f"against {verdict.deployed} ({verdict.candidate_successes}/"
            f"{verdict.candidate_episodes} vs {verdict.deployed_successes}/"
            f"{verdict.deployed_episodes}): {verdict.reason}"
        )

    def _publish_status(self) -> None:
        with self._lock:
            status = self.learner.status() | self.follower.status()
        status["delta_check"] = self.delta_check
        with self._gate_lock:
            status["gate"] = self.gate.status() if self.gate is not None else {"mode": "none"}
        self._status_pub.publish(String(data=json.dumps(status, default=float)))

    def shutdown(self) -> None:
        self._stop.set()
        self._worker.join(timeout=10.0)
        with self._lock:
            try:
                self.learner.save()
            except Exception as exc:  # report; the last published checkpoint stays
                print(f"learner: final checkpoint failed: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    ensure_local_discovery()
    from vlarl.ros.executors import run_node

    return run_node(LearnerNode, name="learner", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
