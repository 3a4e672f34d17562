"""The CLI explains itself and turns bad input into one line (in-process, no network)."""

import argparse
from pathlib import Path

import pytest

from swarmtune.cli import build_parser, main

SUBCOMMANDS = [
    "bootstrap",
    "join",
    "admit",
    "revoke",
    "id",
    "pull",
    "status",
    "eval",
    "demo",
    "simulate",
    "merge",
    "export-base",
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_explains_each_of_its_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    sub = _subparser(command)
    unexplained = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert not unexplained, unexplained
    for action in sub._actions:  # and its help shows every option (but a renamed one's old name)
        if action.help != argparse.SUPPRESS:
            assert all(flag in out for flag in action.option_strings), action.option_strings


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def test_top_level_help_gives_each_subcommand_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for command in SUBCOMMANDS:  # "    join   take part in a run ..."
        assert any(line.split()[:1] == [command] and len(line.split()) > 2 for line in lines), (
            command
        )


def test_bad_config_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner:\n  steps: -3\n")
    code = main(["bootstrap", "--config", str(bad), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "inner.steps" in err
    assert not (tmp_path / "w").exists()  # nothing started, nothing written


def test_export_base_refuses_non_empty_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["export-base", "--out", str(tmp_path)]) == 2
    assert "export-base: error" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_clustered_demo_puts_two_volunteers_on_each_of_four_tasks() -> None:
    from collections import Counter

    from swarmtune.node.roles.demo import DemoOptions

    tasks = [DemoOptions(clustered=True).task_of(i) for i in range(8)]
    assert sorted(Counter(tasks).values()) == [2, 2, 2, 2]
    assert len({DemoOptions().task_of(i) for i in range(5)}) == 5


JOIN = ["join", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmSomething"]


def _no_network(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Make starting a DHT peer in `join` raise `error` instead of touching the network."""
    import swarmtune.node.roles.volunteer

    def refuse(**_: object) -> None:
        raise error

    monkeypatch.setattr(swarmtune.node.roles.volunteer, "SwarmNode", refuse)


@pytest.mark.parametrize("broken", ["missing", "no-weights", "bad-config", "no-tokenizer"])
def test_join_refuses_a_model_dir_that_is_not_a_model_before_any_network(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    broken: str,
) -> None:
    from swarmtune.node.local.basemodel import export_base

    _no_network(monkeypatch, AssertionError("join started a DHT peer before checking --model"))
    model = tmp_path / "not-a-model"
    if broken != "missing":
        export_base(model)
    if broken == "no-weights":
        (model / "model.safetensors").unlink()
    elif broken == "bad-config":
        (model / "config.json").write_text("{not json")
    elif broken == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (model / name).unlink()
    args = ["--data", "builtin:arithmetic", "--model", str(model), "--workdir", str(tmp_path / "w")]
    code = main([*JOIN, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith("swarmtune join: error:") and str(model) in err and "DHT" not in err
    assert not (tmp_path / "w").exists()  # nothing started, nothing written


def test_join_accepts_a_real_model_dir_up_to_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from swarmtune.node.local.basemodel import export_base
    from swarmtune.protocols.swarm import SwarmError

    _no_network(monkeypatch, SwarmError("network reached"))
    model = export_base(tmp_path / "model")
    args = ["--data", "builtin:arithmetic", "--model", str(model), "--workdir", str(tmp_path / "w")]
    assert main([*JOIN, *args]) == 2
    assert capsys.readouterr().err.strip() == "swarmtune join: error: network reached"


def test_announce_without_a_fixed_port_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["join", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmX", "--data"]
    args += ["builtin:arithmetic", "--workdir", str(tmp_path), "--announce", "81.2.69.160"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("swarmtune join: error: --announce needs a fixed --port")
    assert "\n" not in err


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [("--eval-every", "0", "must be at least 1"), ("--overlap", "maybe", "invalid choice")],
)
def test_bad_join_scheduling_flags_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, problem: str
) -> None:
    args = ["join", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmX", "--data"]
    args += ["builtin:arithmetic", "--workdir", str(tmp_path), flag, value]
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and err.startswith("swarmtune join: error:") and problem in err


@pytest.mark.parametrize(
    "argv",
    [
        [*JOIN, "--data", "builtin:dates", "--port", "70000"],
        [*JOIN, "--data", "builtin:dates", "--rounds", "0"],
        [*JOIN, "--data", "builtin:dates", "--threads", "0"],
        ["bootstrap", "--config", "configs/run.yaml", "--http-port", "65536"],
        ["demo", "--peers", "-1"],
        ["simulate", "--config", "x.yaml", "--out", "o", "--threads", "0"],
        ["eval", "--data", "builtin:dates", "--adapter", "a", "--max-length", "0"],
        ["merge", "a", "b", "--method", "cat", "--out", "m", "--rank", "0"],
    ],
)
def test_an_out_of_range_number_is_argparses_one_line_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and err[-1].startswith(f"swarmtune {argv[0]}: error: argument")


def test_options_wrong_together_are_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["pull", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmSomething"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "swarmtune pull: error: --out is required (or --list)"


def test_role_options_are_built_by_name_from_the_parsed_arguments() -> None:
    import dataclasses

    from swarmtune.cli import _options
    from swarmtune.node.roles.coordinator import BootstrapOptions
    from swarmtune.node.roles.evaluator import EvalOptions
    from swarmtune.node.roles.volunteer import JoinOptions

    parser = build_parser()
    args = parser.parse_args([*JOIN, "--data", "d.jsonl", "--port", "4000", "--wait-for", "3"])
    join = _options(JoinOptions, args, ticket="", overlap=None, packing=True, expect_config=None)
    assert (join.port, join.wait_for, join.data, join.rounds) == (4000, 3, "d.jsonl", 1_000_000)
    # every field of each role's options has an option of that name, or is converted
    for cls, command, converted in (
        (JoinOptions, "join", {"ticket", "overlap", "packing", "expect_config"}),
        (BootstrapOptions, "bootstrap", set()),
        (EvalOptions, "eval", {"as_json"}),
    ):
        dests = {a.dest for a in _subparser(command)._actions}
        missing = {f.name for f in dataclasses.fields(cls)} - dests - converted
        assert not missing, (command, missing)


def test_a_merge_option_the_method_does_not_read_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["merge", "a", "b", "--method", "cat", "--out", str(tmp_path / "m"), "--density", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "swarmtune merge: error: cat does not use --density (it reads: none of them)"
    assert main([*argv[:4], "ties", *argv[5:]]) == 2  # ties reads it: the dirs are what is bad
    assert "does not use" not in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_join_checks_the_run_against_expect_config_and_its_old_name_says_so(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from swarmtune.cli import _expect_config

    parser = build_parser()
    new = parser.parse_args([*JOIN, "--data", "d.jsonl", "--expect-config", "run.yaml"])
    assert _expect_config(new) == Path("run.yaml") and not caplog.records
    old = parser.parse_args([*JOIN, "--data", "d.jsonl", "--config", "run.yaml"])
    assert _expect_config(old) == Path("run.yaml")
    assert "now --expect-config" in caplog.records[-1].getMessage()
    both = [*JOIN, "--data", "d.jsonl", "--config", "a.yaml", "--expect-config", "b.yaml"]
    assert main(both) == 2
    assert "give only one" in capsys.readouterr().err
