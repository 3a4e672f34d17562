"""Real hivemind peers on 127.0.0.1, each a separate process (slow: CI runs them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from swarm_harness import (  # noqa: E402
    FAST_CONFIG,
    Swarm,
    assert_lora_weights_are_the_files,
    load_with_plain_peft,
)

from swarmtune.cli import main  # noqa: E402
from swarmtune.node.config import load_config  # noqa: E402
from swarmtune.node.engine.state import decode_state  # noqa: E402
from swarmtune.node.local.basemodel import export_base  # noqa: E402
from swarmtune.node.local.build import build_local_model  # noqa: E402
from swarmtune.node.local.data import builtin_texts, split_cue  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
TASKS = ("arithmetic", "dates", "code")
CHAT = "dates-chat.jsonl"  # v1's data: the dates task as chat records


def _data(swarm: Swarm, i: int) -> str:
    """Volunteer i's --data: v1 brings chat records, the others a built-in task."""
    return str(swarm.tmp / CHAT) if i == 1 else f"builtin:{TASKS[i]}"


def _write_chat(path: Path) -> None:
    """Built-in dates texts as user/assistant turns (question up to the cue, answer after)."""
    rows = []
    for text in builtin_texts("dates", 400, seed=0):
        cue = split_cue("dates", text)
        assert cue is not None
        turns = [("user", text[:cue]), ("assistant", text[cue:].strip())]
        rows.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _reports(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_rounds(workdir: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(_reports(workdir)) < n:
        assert time.monotonic() < deadline, f"{workdir.name} did not reach {n} rounds"
        time.sleep(0.3)


def _left_in_group(pid: int, within: float = 15.0) -> list[str]:
    """What is still running in process group `pid` after `within` seconds (nothing, normally).
    Helpers end on their own schedule once their parent exited: torch_shm_manager waits 2 s
    after its last client, the lifeline polls its parent (protocols/lifeline.py)."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return []
        if time.monotonic() >= deadline:
            left = []
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and os.getpgid(int(entry.name)) == pid:
                        left.append(f"{entry.name} {(entry / 'comm').read_text().strip()}")
                except (ProcessLookupError, OSError):
                    continue
            return left
        time.sleep(0.2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A coordinator and 3 volunteers (one on a 4-bit base, one training in bf16 autocast) that
    ran 3 rounds; the coordinator stays up."""
    # bf16 autocast on a CPU without native bf16 (AVX2 only, as here) trains ~8x slower than
    # fp32: v1 reaches each round seconds after the others, so the window waits for it (rounds
    # after the first still close the moment all three are in)
    config = FAST_CONFIG.format(run_id="itest-run")
    assert "matchmaking_time: 2.0" in config
    swarm = Swarm(
        tmp_path_factory.mktemp("swarm"),
        config_text=config.replace("matchmaking_time: 2.0", "matchmaking_time: 10.0"),
        evaluate=True,  # the tests below read the eval loss, exact match and their plots
    )
    try:
        swarm.start_coordinator("--http-port", "0", "--report-to", "tensorboard")
        # v0 also logs to TensorBoard, v1 trains in bf16 autocast on chat records, v2 on an
        # NF4 (QLoRA) base: all in the same run, and they still end bit-identical (below)
        _write_chat(swarm.tmp / CHAT)
        extra = {
            0: ["--report-to", "tensorboard"],
            1: ["--precision", "bf16", "--device", "cpu"],
            2: ["--quantize", "4bit"],
        }
        # --wait-for 3: the chat volunteer reads its file through `datasets` and arrives a few
        # seconds later; without it, it can miss round 1 and offer a stale start in round 2
        for i in range(3):
            swarm.join(f"v{i}", _data(swarm, i), 3, "--wait-for", "3", *extra.get(i, []))
        codes = [swarm.wait(f"v{i}", 240) for i in range(3)]
        assert codes == [0, 0, 0], "\n".join(swarm.log(f"v{i}") for i in range(3))
        yield swarm
    finally:
        swarm.close()


def test_volunteers_end_on_identical_adapters(trained: Swarm) -> None:
    states = [
        decode_state((trained.tmp / f"v{i}" / "state.safetensors").read_bytes()) for i in range(3)
    ]
    assert {s.round for s in states} == {3}
    assert len({s.digest() for s in states}) == 1
    for i in range(3):
        reports = _reports(trained.tmp / f"v{i}")
        assert [r["round"] for r in reports] == [0, 1, 2]
        assert sum(r["outcome"] == "averaged" for r in reports) >= 2, trained.log(f"v{i}")
        # honest peers on loopback: no rejected round and no excluded contribution, ever; a
        # group may only be missed while the volunteers are still arriving (round 1)
        assert all(r["outcome"] != "rejected" and not r["excluded"] for r in reports)
        assert all(r["outcome"] == "averaged" for r in reports[1:]), trained.log(f"v{i}")
        assert max(r["group_size"] for r in reports) == 3


def test_chat_volunteer_shows_its_data_and_reports_exact_match(trained: Swarm) -> None:
    log = trained.log("v1")
    assert "data: 380 examples (380 chat)" in log  # 1 in 20 held out and "0 truncated" in log
    # the first example as the template renders it, answer and EOS included
    assert re.search(
        r"as the model reads it:\nuser: date: .* =>\nassistant: .+<\|endoftext\|>", log
    )
    assert all(r["eval_exact"] is not None for r in _reports(trained.tmp / "v1"))


def test_loss_after_last_round_is_below_round_zero(trained: Swarm) -> None:
    # one shared adapter serves three different tasks: the group objective is their mean
    config = load_config(trained.config)
    before, after = [], []
    for i in range(3):
        before.append(build_local_model(config, _data(trained, i)).eval_loss())  # B=0: the base
        after.append(_reports(trained.tmp / f"v{i}")[-1]["eval_loss"])
    print("eval loss per task before/after:", list(zip(TASKS, before, after, strict=True)))
    assert sum(after) < sum(before), f"mean eval loss {sum(after) / 3:.4f} >= {sum(before) / 3:.4f}"


def test_pulled_adapter_loads_in_plain_peft_with_same_logits(
    trained: Swarm, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out, base_dir = tmp_path / "adapter", tmp_path / "base"
    pulled = trained.cli("pull", "--initial-peers", trained.maddr, "--out", str(out))
    assert pulled.returncode == 0, pulled.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    )
    assert "round 3" in (out / "README.md").read_text()
    export_base(base_dir)

    model = load_with_plain_peft(base_dir, out)  # fails on PEFT's missing-keys warning
    assert_lora_weights_are_the_files(model, out)

    config = load_config(trained.config)
    swarm_model = build_local_model(config, "builtin:arithmetic")
    state = decode_state((trained.tmp / "v0" / "state.safetensors").read_bytes())
    swarm_model.trainer.set_params(state.params)
    ids = torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = swarm_model.model.eval()(input_ids=ids).logits
        theirs = model.eval()(input_ids=ids).logits
    # the same weights through the same PEFT forward: a few fp32 ulps of the largest logit at most
    atol = 16 * torch.finfo(torch.float32).eps * float(ours.abs().max())
    torch.testing.assert_close(theirs, ours, atol=atol, rtol=0)
    assert not torch.equal(ours, AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits)

    again = trained.cli("pull", "--initial-peers", trained.maddr, "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_status_lists_peers_and_adapters(
    trained: Swarm, capsys: pytest.CaptureFixture[str]
) -> None:
    # in-process (a fresh DHT client, as the command makes): `status --json` below runs the CLI
    assert main(["status", "--initial-peers", trained.maddr]) == 0
    shown = capsys.readouterr().out
    assert shown.count("volunteer") == 3 and "global" in shown
    assert main(["pull", "--initial-peers", trained.maddr, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "global" in listed and "     3" in listed


def _page_url(swarm: Swarm) -> str:
    found = re.search(r"status page: (http://127\.0\.0\.1:\d+/)", swarm.log("coord"))
    assert found, swarm.log("coord")
    return found.group(1)


def _peer_rows(view: dict) -> dict[str, tuple]:
    keys = ("role", "round", "task", "loss", "eval_loss", "group_size", "cluster", "resyncs")
    return {p["peer_id"]: tuple(p[k] for k in keys) for p in view["peers"]}


def test_status_page_json_is_what_status_json_shows(trained: Swarm) -> None:
    with urllib.request.urlopen(_page_url(trained) + "api/status", timeout=10) as response:
        page = json.loads(response.read())
    shown = trained.cli("status", "--initial-peers", trained.maddr, "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert page["run"] == status["run"] and page["run"]["run_id"] == "itest-run"
    assert _peer_rows(page) == _peer_rows(status)
    assert sorted(r[0] for r in _peer_rows(page).values()) == ["coordinator"] + ["volunteer"] * 3
    assert page["adapters"] == status["adapters"] and page["adapters"][0]["name"] == "global"
    assert status["dropped_records"] == 0  # every record here is its peer's own
    assert status["unreadable_records"] == 0  # and every one reads as a peer record
    # the history has every volunteer's rounds, with the numbers their metrics files hold
    for i in range(3):
        reports = _reports(trained.tmp / f"v{i}")
        mine = [p for p in page["history"] if p["task"] == _data(trained, i)[:64]]
        assert [p["round"] for p in mine] == [1, 2, 3]
        assert mine[-1]["eval_loss"] == pytest.approx(reports[-1]["eval_loss"], rel=1e-6)
        assert 0 < mine[-1]["inner_s"] <= mine[-1]["wall_s"]
    with urllib.request.urlopen(_page_url(trained) + "api/status?since=1e12", timeout=10) as r:
        assert json.loads(r.read())["history"] == []  # the page asks only for newer points


def test_status_page_renders_its_plots_and_peers_in_a_browser(
    trained: Swarm, tmp_path: Path
) -> None:
    browser = next(
        (
            shutil.which(b)
            for b in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(b)
        ),
        None,
    )
    if browser is None:
        pytest.skip("no Chromium here: `make test` installs Debian's chromium where it can")
    url = _page_url(trained)
    headless = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=8000",
    ]
    shot = tmp_path / "page.png"
    run = subprocess.run(
        [*headless, f"--screenshot={shot}", "--window-size=1300,1900", url],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists(), run.stderr.decode()[-2000:]
    dom = subprocess.run(
        [*headless, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    assert re.search(r'<body[^>]* data-rendered="[1-9]', dom), dom[:2000]
    with urllib.request.urlopen(url + "api/status", timeout=10) as response:
        live = [p["peer_id"] for p in json.loads(response.read())["peers"]]
    assert sorted(re.findall(r'<tr data-peer="(\w+)"', dom)) == sorted(live)
    series = dict(re.findall(r'<svg id="plot-([\w-]+)"[^>]* data-series="(\d+)"', dom))
    assert series["eval"] == series["loss"] == series["exact"] == "3", series  # one per volunteer
    assert series["time"] == "4", series  # inner, matchmaking, transfer, other
    others = ("cluster", "cluster-loss", "util", "bytes")
    assert all(int(series[p]) >= 1 for p in others), series
    # and the curves reached the pixels: the first two series colours are on the screenshot
    pixels = Image.open(shot).convert("RGB").getdata()
    counts = Counter(pixels)
    assert counts[(0x1F, 0x77, 0xB4)] > 200 and counts[(0xD6, 0x27, 0x28)] > 200


def test_tensorboard_logs_of_a_volunteer_and_of_the_coordinator(trained: Swarm) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(workdir: Path) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(workdir / "tensorboard"))
        events.Reload()
        return {t: [(s.step, s.value) for s in events.Scalars(t)] for t in events.Tags()["scalars"]}

    mine = scalars(trained.tmp / "v0")
    reports = _reports(trained.tmp / "v0")
    assert [step for step, _ in mine["loss/eval"]] == [1, 2, 3]
    assert mine["loss/eval"][-1][1] == pytest.approx(reports[-1]["eval_loss"], rel=1e-6)
    exact = reports[-1]["eval_exact"]  # a share of 32 held-out built-in prompts
    assert [step for step, _ in mine["eval/exact_match"]] == [1, 2, 3]
    assert 0 <= exact <= 1 and mine["eval/exact_match"][-1][1] == pytest.approx(exact, abs=1e-6)
    assert {"time/utilization", "bytes/sent", "group/size"} <= set(mine)
    swarm = scalars(trained.tmp / "coord")
    assert len([t for t in swarm if t.startswith("peer_eval/")]) == 3
    assert len([t for t in swarm if t.startswith("peer_exact/")]) == 3
    assert [step for step, _ in swarm["cluster_eval/run-wide"]] == [1]  # rounds 2-3 pending


def test_mismatched_base_model_is_refused(trained: Swarm, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir, other = tmp_path / "base", tmp_path / "other"
    export_base(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / name).write_bytes((base_dir / name).read_bytes())
    refused = trained.cli(
        "join",
        "--initial-peers",
        trained.maddr,
        "--data",
        "builtin:dates",
        "--model",
        str(other),
        "--workdir",
        str(tmp_path / "w"),
        "--rounds",
        "1",
    )
    assert refused.returncode == 2
    assert "base model mismatch" in refused.stderr and "Traceback" not in refused.stderr


def test_bad_inputs_are_one_clear_line(
    trained: Swarm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = trained.maddr.rsplit("/tcp/", 1)[0] + "/tcp/1/p2p/" + trained.maddr.rsplit("/", 1)[1]
    join = ["join", "--rounds", "1", "--initial-peers"]
    for args, expected in (
        ([dead, "--data", "builtin:dates", "--workdir", str(tmp_path / "a")], "cannot start a DHT"),
        ([trained.maddr, "--data", "builtin:poetry", "--workdir", str(tmp_path / "b")], "unknown"),
    ):
        assert main([*join, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err


GHBM_CONFIG = """run_id: itest-ghbm
inner: {steps: 10, batch_size: 8, seq_len: 48}
outer: {name: ghbm, tau: 2}
averaging: {matchmaking_time: 2.0}
"""


def test_ghbm_ring_reaches_a_late_joiner_overlapped_members_agree_and_ctrl_c_ends_all(
    tmp_path: Path,
) -> None:
    # v0 and the late joiner overlap communication with compute, v1 runs synchronous rounds;
    # at the end a terminal's Ctrl+C (SIGINT to each process group) ends every peer cleanly
    swarm = Swarm(tmp_path, config_text=GHBM_CONFIG)
    try:
        swarm.start_coordinator()
        swarm.join("v0", "arithmetic", 40, "--overlap", "on")
        swarm.join("v1", "dates", 40)
        # the late joiner takes seconds to start: by the time it joins, the ring is full
        _wait_rounds(tmp_path / "v0", 1, 180)
        swarm.join("late", "code", 4, "--overlap", "on")
        assert swarm.wait("late", 180) == 0, swarm.log("late")
        assert "synced to the group's state at round" in swarm.log("late")
        reports = _reports(tmp_path / "late")
        # an averaged group means every member started from the same digest, ring included
        assert any(r["outcome"] == "averaged" and r["group_size"] == 3 for r in reports), reports
        assert all(r["tau"] == 2 for r in reports) and "ghbm tau 2" in swarm.log("late")
        state = decode_state((tmp_path / "late" / "state.safetensors").read_bytes())
        assert len(state.outer_state["history"]) == 3
        peers = ("v0", "v1", "coord")
        for name in peers:
            os.killpg(swarm.procs[name].pid, signal.SIGINT)  # what a terminal's Ctrl+C does
        assert [swarm.wait(n, 60) for n in peers] == [0, 0, 0], [swarm.log(n) for n in peers]
        traced = {n: swarm.log(n) for n in (*peers, "late") if "Traceback" in swarm.log(n)}
        assert not traced, traced
        left = {n: _left_in_group(swarm.procs[n].pid) for n in (*peers, "late")}
        assert not any(left.values()), left
        overlapped = {r["round"]: r for r in _reports(tmp_path / "v0")}
        synchronous = {r["round"]: r for r in _reports(tmp_path / "v1")}
        assert all(r["overlapped"] for r in overlapped.values())
        assert not any(r["overlapped"] for r in synchronous.values())
        # rounds both averaged in the same group end on the same digest
        shared = [
            n
            for n, r in overlapped.items()
            if n in synchronous
            and r["outcome"] == synchronous[n]["outcome"] == "averaged"
            and r["members"] == synchronous[n]["members"]
        ]
        assert len(shared) >= 3, (overlapped, synchronous)
        assert all(overlapped[n]["digest"] == synchronous[n]["digest"] for n in shared)
    finally:
        swarm.close()
