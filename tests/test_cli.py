"""The CLI explains itself and turns bad input into one line (in-process, no network)."""

from pathlib import Path

import pytest

from cli import build_parser, main

SUBCOMMANDS = ["bootstrap", "join", "pull", "status", "demo", "simulate", "merge", "export-base"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"swarmtune {command}" in out and "--" in out


def test_top_level_help_lists_roles(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(word in out for word in ("bootstrap", "join", "pull", "demo"))


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

    from node.demo import DemoOptions

    tasks = [DemoOptions(clustered=True).task_of(i) for i in range(8)]
    assert sorted(Counter(tasks).values()) == [2, 2, 2, 2]
    assert len({DemoOptions().task_of(i) for i in range(5)}) == 5
