"""The README stays true: its topic table, its test command in .ci/run, the package layout.

The launch file is compared with ``vlarl bringup`` in test_launch_parity.py."""

from __future__ import annotations

import re
import site
import sys
import sysconfig
from pathlib import Path

import pytest

from vlarl.graph import GRAPH, LEARNING
from vlarl.topics import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_topic_table_matches_topics_module() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- topics:begin[^\n]*-->\n(.*?)<!-- topics:end -->", readme, re.S)
    assert match, "README lost its topic table markers"
    assert match.group(1).strip() == markdown_table().strip(), (
        "run: vlarl topics, paste into README"
    )


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"## Tests\s+```bash\n(.+?)\n```", readme, re.S)
    assert command
    ci = (ROOT / ".ci" / "run").read_text()
    assert command.group(1).strip() in ci


def test_every_node_has_a_console_script_a_module_and_a_parameter_file() -> None:
    setup = (ROOT / "setup.py").read_text()
    for spec in (*GRAPH, *LEARNING):
        assert f'"{spec.name}": "{spec.module}:main"' in setup
        assert (ROOT / "src" / (spec.module.replace(".", "/") + ".py")).is_file(), spec.module
        assert (ROOT / "config" / spec.params_file).is_file(), spec.params_file


def test_colcon_workspace_reaches_the_package() -> None:
    link = ROOT / "ros2_ws" / "src" / "vlarl"
    assert (link / "package.xml").is_file()
    assert (link / "setup.py").is_file()


def test_readme_links_stay_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if re.match(r"[a-z]+://", target):
            continue
        assert (ROOT / target).resolve().is_relative_to(ROOT), target
        assert (ROOT / target).exists(), target
    assert (ROOT / "docs" / "DESIGN.md").is_file()


def test_readme_python_api_runs_and_uses_only_exported_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vlarl

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.+?)```", section, re.S)
    assert code, "README's Python API section lost its example"
    used = set(re.findall(r"\bvlarl\.([A-Za-z_]\w*)", code.group(1)))
    listed = set(re.findall(r"`(\w+)`", section.split("| name |", 1)[1]))
    exported = set(vlarl.__all__) - {"__version__"}
    assert used <= exported, used - exported
    assert exported <= listed, exported - listed
    assert {name for name in listed if hasattr(vlarl, name)} == exported
    monkeypatch.chdir(ROOT)
    exec(compile(code.group(1), "README.md", "exec"), {})


def test_package_root_finds_a_pip_installed_share_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wheel from `pip install .` puts config/ under <prefix>/share/vlarl (setup.py's
    data_files), with no ament index to ask."""
    from vlarl import graph

    share = tmp_path / "prefix" / "share" / "vlarl"
    (share / "config").mkdir(parents=True)
    site_packages = tmp_path / "prefix" / "lib" / "python3" / "site-packages" / "vlarl"
    monkeypatch.setattr(graph, "__file__", str(site_packages / "graph.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *args, **kwargs: sys.prefix)
    monkeypatch.setattr(site, "getuserbase", lambda: str(tmp_path / "user"))
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    assert graph.package_root() == share
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="pip install"):
        graph.package_root()
