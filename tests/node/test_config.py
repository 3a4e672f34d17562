"""Every file in configs/ loads; bad values give one clear line."""

from pathlib import Path

import pytest
import yaml

from swarmtune.aggregation.methods import make_peer_momentum
from swarmtune.node.config import (
    ConfigError,
    RunConfig,
    SimConfig,
    load_config,
    load_sim_config,
    parse_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path: Path) -> None:
    if path.parent.name == "sim":
        assert isinstance(load_sim_config(path), SimConfig)
    else:
        assert isinstance(load_config(path), RunConfig)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("participation: 0\n", "participation: Input should be greater than 0"),
        ("heterogeneity: {kind: zipf}\n", "heterogeneity.kind"),
        ("run: {outer: {name: ghbm, tau: 0}}\n", "run.outer.tau"),
        ("run: {outer: {name: ghbm, tau: sometimes}}\n", "run.outer.tau"),
        ("run: {outer: {name: fedavgm, momentum: 1.0}}\n", "momentum must be < 1"),
        ("run: {inner: {deadline_s: 10}}\n", "the simulator trains H steps per client"),
        ("run: {inner: {deadline_s: auto}}\n", "the simulator trains H steps per client"),
    ],
)
def test_bad_sim_config_is_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sim_config(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_every_shipped_config_loads_with_its_loader() -> None:
    shipped = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert {p.name for p in shipped} >= {"run.yaml", "demo.yaml", "quick.yaml"}
    for path in shipped:  # configs/sim/ are simulator configs; the rest run configs
        loaded = load_sim_config(path) if path.parent.name == "sim" else load_config(path)
        assert loaded is not None, path


@pytest.mark.parametrize(
    "text,expected",
    [
        ("inner:\n  steps: 0\n", "inner.steps: Input should be greater than or equal to 1"),
        ("outer:\n  name: adamw\n", "outer.name"),
        ("bogus: 1\n", "bogus: Extra inputs are not permitted"),
        ("run_id: Bad Name\n", "run_id: String should match pattern"),
        ("averaging:\n  codec: int3\n", "averaging.codec"),
        ("- a list\n", "expected a mapping"),
        ("inner: [unclosed\n", "not valid YAML at line"),
        (
            "inner: {deadline_s: 30}\naveraging: {weight: tokens}\n",
            "inner.deadline_s needs averaging.weight: steps",
        ),
        ("inner: {deadline_s: 0}\n", "inner.deadline_s: Input should be greater than 0"),
        (
            "inner: {deadline_s: auto}\naveraging: {weight: tokens}\n",
            "inner.deadline_s needs averaging.weight: steps",
        ),
        ("inner: {deadline_s: soon}\n", "inner.deadline_s"),
        ("averaging: {weight: examples}\n", "averaging.weight"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "outer,tau",
    [
        ("{name: local-ghbm}", "auto"),
        ("{name: fedhbm}", "auto"),
        ("{name: fedhbm, tau: 10}", 10),
        ("{name: ghbm}", 1),
        ("{name: ghbm-server}", 1),
    ],
)
def test_per_peer_momentum_defaults_to_tau_auto(tmp_path: Path, outer: str, tau: object) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"outer: {outer}\n")
    settings = load_config(path).outer
    assert settings.tau == tau
    momentum = make_peer_momentum(settings.name, settings.effective_momentum, settings.tau)
    assert momentum is None or momentum.tau_setting == tau


@pytest.mark.parametrize("text,fixed", [("30", 30.0), ("2.5", 2.5), ("auto", None), ("null", None)])
def test_a_deadline_is_seconds_auto_or_none(text: str, fixed: float | None) -> None:
    config = parse_config({"inner": {"deadline_s": yaml.safe_load(text)}}, "run.yaml")
    assert config.inner.fixed_deadline() == fixed
    assert (config.inner.deadline_s == "auto") == (text == "auto")
