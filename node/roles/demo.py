"""`swarmtune demo`: a coordinator and N volunteers on 127.0.0.1, R rounds, then a pulled adapter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from swarmtune.aggregation.taskvec import adjusted_rand_index
from swarmtune.node.config import load_config
from swarmtune.node.local.data import BUILTIN_TASKS, data_spec
from swarmtune.protocols.sockets import remove_stale_hivemind_sockets
from swarmtune.protocols.swarm import SwarmError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
CLUSTERED_CONFIG = CONFIGS / "clustered.yaml"
CLUSTERED_TASKS = 4  # built-in tasks, two volunteers each


@dataclass
class DemoOptions:
    """What the newcomer may change."""

    peers: int = 3
    rounds: int = 6
    out: Path = Path("demo-adapter")
    config: Path | None = None
    workdir: Path | None = None
    clustered: bool = False

    def task_of(self, index: int) -> str:
        """Volunteer i's task: round robin, or two per task in clustered mode."""
        if self.clustered:
            return BUILTIN_TASKS[(index // 2) % CLUSTERED_TASKS]
        return BUILTIN_TASKS[index % len(BUILTIN_TASKS)]


class Processes:
    """Child processes, each in its own process group, with prefixed output; always cleaned up."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(
        self, name: str, args: list[str], program: list[str] | None = None
    ) -> subprocess.Popen[str]:
        """Run `python -m swarmtune.cli ARGS` (or `python PROGRAM ARGS`), echoing its lines as
        `[name] ...`."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, *(program or ["-m", "swarmtune.cli"]), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        assert proc.stdout is not None
        threading.Thread(target=_echo, args=(name, proc.stdout), daemon=True).start()
        self.procs[name] = proc
        return proc

    def stop_all(self, grace: float = 20.0) -> None:
        """SIGTERM every group we started, wait, then SIGKILL whatever is left."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[str], signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def _echo(name: str, stream: IO[str]) -> None:
    for line in stream:
        print(f"[{name:>6}] {line.rstrip()}", flush=True)


def _wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SwarmError("the demo coordinator did not start (see its output above)")
        time.sleep(0.2)
    return path.read_text().split()[0]


def summarize(workdirs: list[Path], out: Path, started: float) -> str:
    """Loss per round (mean over volunteers), bytes moved, and how to load the adapter."""
    per_peer = _by_peer(workdirs)
    per_round: dict[int, list[dict]] = {}
    for report in (r for reports in per_peer for r in reports):
        per_round.setdefault(report["round"], []).append(report)
    lines = [
        "",
        "round  mean inner loss  mean eval loss  exact match  group  MB sent (all peers)"
        "  not averaged",
    ]
    total = 0
    for round_, reports in sorted(per_round.items()):
        sent = sum(r["bytes_sent"] for r in reports)
        total += sent
        evals = [r["eval_loss"] for r in reports if r["eval_loss"] is not None]
        exacts = [r["eval_exact"] for r in reports if r.get("eval_exact") is not None]
        exact = f"{sum(exacts) / len(exacts):.0%}" if exacts else "-"
        missed = sum(r.get("outcome", "averaged") != "averaged" for r in reports)
        lines.append(
            f"{round_ + 1:>5}  {sum(r['loss_mean'] for r in reports) / len(reports):>15.3f}"
            f"  {sum(evals) / max(len(evals), 1):>14.3f}  {exact:>11}  "
            f"{max(r['group_size'] for r in reports):>5}  {sent / 1e6:>19.2f}  {missed:>12}"
        )
    last = [reports[-1] for reports in per_peer]
    lines += [
        f"\n{len(workdirs)} volunteers, {total / 1e6:.2f} MB of contributions sent, "
        f"{time.monotonic() - started:.0f}s in all.",
        "rounds without the group aggregate, all volunteers: "
        f"{sum(r.get('fallbacks', 0) for r in last)} no group, "
        f"{sum(r.get('rejections', 0) for r in last)} rejected, "
        f"{sum(r.get('exclusions', 0) for r in last)} contributions excluded; "
        f"{sum(r.get('resyncs', 0) for r in last)} resyncs.",
        f"adapter: {out.resolve()}",
        "load it with plain PEFT:",
        "  swarmtune export-base --out ./base",
        '  python -c "from transformers import AutoModelForCausalLM; from peft import PeftModel;'
        f" PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('./base'), '{out}')\"",
    ]
    return "\n".join(lines)


def _by_peer(workdirs: list[Path]) -> list[list[dict]]:
    """Each volunteer's reports from its metrics.jsonl (volunteers with none are left out)."""
    found = []
    for workdir in workdirs:
        metrics = workdir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines:
            found.append([json.loads(line) for line in lines])
    return found


def cluster_summary(workdirs: list[Path], tasks: list[str]) -> str:
    """Which cluster each volunteer ended in, and the adjusted Rand index against the tasks."""
    clusters = []
    for workdir in workdirs:
        path = workdir / "cluster.json"
        clusters.append(json.loads(path.read_text())["cluster"] if path.exists() else -1)
    lines = ["", "volunteer  task        cluster"]
    lines += [
        f"{w.name:<10} {t:<11} {c:>7}" for w, t, c in zip(workdirs, tasks, clusters, strict=True)
    ]
    ari = adjusted_rand_index(tasks, clusters)
    lines.append(
        f"clusters vs tasks: adjusted Rand index {ari:.3f} (1.0 = tasks recovered exactly)"
    )
    return "\n".join(lines)


def start_coordinator(
    procs: Processes, config: Path, coord_dir: Path, addr_file: Path, *extra: str
) -> str:
    """Start `swarmtune bootstrap` as "coord" (`extra`: more of its arguments) and return its
    multiaddr once it wrote `addr_file`."""
    args = ["bootstrap", "--config", str(config), "--workdir", str(coord_dir)]
    coord = procs.start("coord", [*args, "--addr-file", str(addr_file), *extra])
    return _wait_for_file(addr_file, coord, timeout=120)


def start_swarm(
    procs: Processes,
    config: Path,
    workdir: Path,
    tasks: list[str],
    rounds: int,
    extra: tuple[str, ...] = (),
) -> tuple[str, list[Path]]:
    """Start a coordinator and one volunteer per task (vol1, vol2, ...; a built-in task's name,
    or any data spec) under `workdir`, each
    volunteer with `extra` join arguments; returns the coordinator's multiaddr and the
    volunteers' work dirs."""
    # --http-port 0: the status page, to watch the run live (its URL is logged)
    maddr = start_coordinator(
        procs, config, workdir / "coord", workdir / "addr", "--http-port", "0"
    )
    volunteers = [workdir / f"vol{i + 1}" for i in range(len(tasks))]
    for task, vol in zip(tasks, volunteers, strict=True):
        procs.start(
            vol.name,
            [
                "join",
                "--initial-peers",
                maddr,
                "--data",
                data_spec(task),
                "--workdir",
                str(vol),
                "--rounds",
                str(rounds),
                "--threads",
                "1",
                *extra,
            ],
        )
    return maddr, volunteers


def wait_all(running: list[subprocess.Popen[str]], poll_s: float = 0.5) -> list[int | None]:
    """Exit codes once every process ended, or as soon as one failed (the others, which may be
    waiting for it to start, are left for the caller to stop): its code, None for the rest."""
    while True:
        codes = [p.poll() for p in running]
        if all(c is not None for c in codes) or any(c for c in codes):
            return codes
        time.sleep(poll_s)


def run_demo(options: DemoOptions) -> int:
    """Entry point of `swarmtune demo`."""
    if options.peers < 2 or options.rounds < 1:
        raise SwarmError("the demo needs --peers >= 2 and --rounds >= 1")
    if options.out.exists() and any(options.out.iterdir()):
        raise SwarmError(f"--out {options.out} exists and is not empty; choose a new directory")
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="swarmtune-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = options.config or (CLUSTERED_CONFIG if options.clustered else DEMO_CONFIG)
    load_config(config)  # a missing or bad config is one line, before any process starts
    procs, started = Processes(), time.monotonic()
    try:
        tasks = [options.task_of(i) for i in range(options.peers)]
        # the volunteers start their first round together, once all of them are in
        start = ("--wait-for", str(options.peers))
        maddr, volunteers = start_swarm(procs, config, workdir, tasks, options.rounds, start)
        codes = wait_all([procs.procs[v.name] for v in volunteers])
        if any(codes):
            shown = ["running" if c is None else c for c in codes]
            raise SwarmError(f"a volunteer failed (exit codes {shown}); see its output above")
        if options.clustered:
            print(cluster_summary(volunteers, tasks))
        pulled = subprocess.run(
            [
                sys.executable,
                "-m",
                "swarmtune.cli",
                "pull",
                "--initial-peers",
                maddr,
                "--out",
                str(options.out),
                "--adapter",
                "merged" if options.clustered else "global",
            ],
            text=True,
            capture_output=True,
        )
        print(pulled.stdout + pulled.stderr, end="")
        if pulled.returncode != 0:
            raise SwarmError("pulling the adapter failed")
        print(summarize(volunteers, options.out, started))
        return 0
    finally:
        procs.stop_all()
        remove_stale_hivemind_sockets()
        if options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
