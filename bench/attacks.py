"""Benchmark: hostile volunteers against the round, the plain mean vs the robust default.

Two parts, both on this machine:

- simulator, groups of 4 with 1 attacker and 8 with 2 (8 real peers do not fit on 2 cores):
  the daemon's round code (node/engine/round.py: selection, weight bound, bans, aggregation,
  outer step) with every member in one group every round. The hostile members' contributions
  are tests/attackers/adversaries.py's forgeries. "trusting mean" is the round as it was before
  the defences: no weight bound, no admission, and what a liar sends is averaged (the old
  hivemind all-reduce kept a malformed member's tensor, and its reducers were trusted).
  A trusting member weighs what each member claims (`weight: tokens`, the old default), so the
  step-weight checks are off there too. "defended" is today's round with the robust default:
  what the real exchange excludes (malformed metadata, bytes that do not match their
  commitment, no ticket) is excluded as the real-peer tests show it is
  (tests/integration/test_attacks.py).
- real peers, group of 4 with 1 attacker: coordinator + 3 honest volunteers + 1 volunteer run
  by bench/hostile_join.py, as separate processes on 127.0.0.1, once with `aggregator: mean`
  and once with `centered-clip`; token admission, so the unadmitted attacker is real too.

Run:  .venv/bin/python bench/attacks.py [--sim-rounds 8] [--real-rounds 6] [--skip-real]
Writes bench/out/attacks.json and rewrites the `attacks` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from results_md import replace_section  # noqa: E402

import swarmtune.node.engine.round as round_code  # noqa: E402
from swarmtune.node.config import SimConfig, parse_config  # noqa: E402
from swarmtune.node.engine.round import LocalUpdate  # noqa: E402
from swarmtune.node.engine.transport import AveragingFailed, GroupResult  # noqa: E402
from swarmtune.node.local.data import BUILTIN_TASKS  # noqa: E402
from swarmtune.node.roles.admit import admit, peer_id  # noqa: E402
from swarmtune.node.roles.demo import Processes, start_coordinator  # noqa: E402
from swarmtune.node.roles.simulate import Simulation  # noqa: E402
from swarmtune.protocols.routing import REVEAL_WAIT_S  # noqa: E402
from tests.attackers.adversaries import ADVERSARIES, ALIE, Adversary  # noqa: E402

ATTACKS = sorted(ADVERSARIES)
HOSTILE = ROOT / "bench" / "hostile_join.py"
TASKS = list(BUILTIN_TASKS[:4])
RUN: dict[str, Any] = {"inner": {"steps": 10, "batch_size": 8, "seq_len": 48}}
# --outer: the product's default outer optimizer (fedavg, lr 1, since the outer-optimizer study),
# or DiLoCo's Nesterov at lr 0.7, which every table of this bench used before 2026-11-25
OUTERS: dict[str, dict[str, Any]] = {
    "default": {},
    "nesterov": {"name": "nesterov", "lr": 0.7, "momentum": 0.9},
}
ROBUST = {"aggregator": "centered-clip", "norm_bound": 1.0}  # the defaults, spelled out
# the trusting baseline also takes each member's weight as it comes: tokens, as before the
# step-weight default (whose whole-step check and median rescaling are defences too)
PLAIN = {"aggregator": "mean", "norm_bound": None, "weight": "tokens"}


def reproduce() -> str:
    """The closing sentence of every table's note: the outer optimizer and the command."""
    command = " ".join(["bench/attacks.py", *sys.argv[1:]])
    return f"{outer_text().capitalize()}. Reproduce: `.venv/bin/python {command}`"


def outer_text() -> str:
    """The outer optimizer every run of this invocation uses, for the tables."""
    outer = parse_config({"run_id": "attack-bench", **RUN}).outer
    momentum = f", momentum {outer.momentum}" if outer.momentum is not None else ""
    return f"outer optimizer {outer.name}, lr {outer.effective_lr}{momentum}"


class AttackedSimulation(Simulation):
    """Every client in one group each round; the last `hostile` clients forge."""

    def __init__(
        self,
        config: SimConfig,
        seed: int,
        adversary: Adversary | None,
        hostile: int,
        defended: bool,
    ) -> None:
        super().__init__(config, seed)
        self.adversary, self.defended = adversary, defended
        self.hostile = {c.name for c in self.clients[len(self.clients) - hostile :]}
        self.gen = torch.Generator().manual_seed(seed)
        # the honest members' eval loss: only the tasks some honest client trains on
        honest_tasks = {t for c in self.clients if c.name not in self.hostile for t in c.mixture}
        self.eval_sets = {t: b for t, b in self.eval_sets.items() if t in honest_tasks}

    def gather(self, updates: list[LocalUpdate]) -> GroupResult | AveragingFailed:
        if self.adversary is None:
            return super().gather(updates)
        honest = [u.delta for u in updates if u.meta.peer not in self.hostile]
        metas, contributions, missing = [], {}, {}
        for u in updates:
            peer = u.meta.peer
            if peer not in self.hostile:
                metas.append(u.meta)
                contributions[peer] = u.delta
                continue
            forged = self.adversary.forge(u.delta, honest, u.meta.weight, self.gen)
            if self.defended and forged.malformed:  # never parsed: not a member
                missing[peer] = "malformed metadata"
                continue
            metas.append(dataclasses.replace(u.meta, weight=forged.weight))
            if self.defended and forged.equivocate:
                missing[peer] = "peer offers another sha256 than it committed to"
            elif self.defended and not forged.ticket:
                missing[peer] = "not admitted: no admission ticket"
            else:
                contributions[peer] = forged.delta
        return GroupResult(metas, contributions, missing)


@contextlib.contextmanager
def trusting(enabled: bool) -> Iterator[None]:
    """The round without the weight bound (the trusting baseline)."""
    bound = round_code.max_round_weight
    if enabled:
        round_code.max_round_weight = lambda config: math.inf  # type: ignore[assignment]
    try:
        yield
    finally:
        round_code.max_round_weight = bound  # type: ignore[assignment]


@contextlib.contextmanager
def timed_aggregation(times: list[float]) -> Iterator[None]:
    """Record the seconds of every aggregation (combine) the round code makes."""
    combine = round_code.combine

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return combine(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - started)

    round_code.combine = timed  # type: ignore[assignment]
    try:
        yield
    finally:
        round_code.combine = combine  # type: ignore[assignment]


def sim_config(
    clients: int, rounds: int, robust: bool, tasks: list[str] = TASKS, least: int = 2
) -> SimConfig:
    averaging = {**(ROBUST if robust else PLAIN), "min_group_size": least}
    run = {**RUN, "averaging": averaging}
    return SimConfig.model_validate(
        {
            "run": run,
            "clients": clients,
            "participation": 1.0,
            "tasks": tasks,
            "rounds": rounds,
            "seeds": [0],
            "texts_per_client": 200,
            "eval_batches": 2,
            "eval_every": rounds,
        }
    )


def run_sim(
    clients: int,
    hostile: int,
    attack: str | None,
    robust: bool,
    rounds: int,
    tasks: list[str] = TASKS,
    adversary: Adversary | None = None,
    least: int = 2,
) -> dict:
    """One simulated run; final eval loss, round outcomes, exclusions, aggregation and wall s.
    `adversary` replaces the named attack's default one (e.g. ALIE with another z)."""
    times: list[float] = []
    if adversary is None and attack:
        adversary = ADVERSARIES[attack]()
    started = time.perf_counter()
    with trusting(not robust), timed_aggregation(times):
        config = sim_config(clients, rounds, robust, tasks, least)
        sim = AttackedSimulation(config, 0, adversary, hostile, robust)
        result = sim.run()
    wall = time.perf_counter() - started
    outcomes = Counter(r.outcome for r in sim.reports)
    return {
        "eval_loss": result.rows[-1]["eval_loss"],
        "averaged": outcomes["averaged"],
        "rejected": outcomes["rejected"] + outcomes["no-group"],
        "excluded": sum(len(r.excluded) for r in sim.reports),
        "aggregate_s": sum(times) / max(len(times), 1),
        "round_s": wall / rounds,
    }


def run_real(attack: str | None, aggregator: str, rounds: int, workdir: Path) -> dict:
    """Coordinator + 3 honest volunteers + 1 hostile (or a 4th honest one for the clean run);
    the honest volunteers' final eval loss and round counters."""
    workdir.mkdir(parents=True)
    config = {
        "run_id": "attack-bench",
        **RUN,
        "averaging": {"matchmaking_time": 2.0, **(ROBUST if aggregator != "mean" else PLAIN)},
        "admission": {"policy": "token"},
    }
    parse_config(config)
    (workdir / "run.yaml").write_text(json.dumps(config))
    procs = Processes()
    try:
        maddr = start_coordinator(procs, workdir / "run.yaml", workdir / "c", workdir / "addr")
        vols = [workdir / f"vol{i + 1}" for i in range(4)]
        for index, (task, vol) in enumerate(zip(TASKS, vols, strict=True)):
            hostile = attack is not None and index == 3
            ticket = admit(workdir / "c", peer_id(vol), 1.0)
            if hostile and attack == "unadmitted":
                ticket = ""
            args = ["--initial-peers", maddr, "--data", f"builtin:{task}", "--workdir", str(vol)]
            args += ["--rounds", str(rounds), "--threads", "1"]
            args += ["--ticket", ticket] if ticket else []
            if hostile:
                procs.start(vol.name, [attack, *args], program=[str(HOSTILE)])
            else:
                procs.start(vol.name, ["join", *args])
        codes = {v.name: procs.procs[v.name].wait(timeout=60 + 30 * rounds) for v in vols[:3]}
        crashed = procs.procs[vols[3].name].poll()
        if attack is not None and crashed not in (None, 0):  # a silent no-show is no attack
            raise RuntimeError(f"the hostile volunteer ({attack}) exited {crashed}: see its output")
    finally:
        procs.stop_all()
    metrics = [
        [json.loads(x) for x in (v / "metrics.jsonl").read_text().splitlines()] for v in vols[:3]
    ]
    finals = [m[-1] for m in metrics if m]
    reports = [r for m in metrics for r in m]  # every honest volunteer's rounds
    return {
        "exit_codes": codes,
        "eval_loss": sum(f["eval_loss"] for f in finals) / max(len(finals), 1),
        "rounds": min(len(m) for m in metrics),
        "averaged": sum(1 for r in reports if r["outcome"] == "averaged"),
        "not_averaged": sum(1 for r in reports if r["outcome"] != "averaged"),
        "excluded": sum(len(r["excluded"]) for r in reports),
        "resyncs": max(f["resyncs"] for f in finals) if finals else 0,
        "refused": sum(f.get("refused", 0) for f in finals),
        "round_s": sum(r["wall_s"] for r in reports) / max(len(reports), 1),
        # fetching the others' contributions: where a withholder's reveal wait shows
        "transfer_s": sum(r["transfer_s"] for r in reports) / max(len(reports), 1),
        "full_waits": sum(1 for r in reports if r["transfer_s"] >= REVEAL_WAIT_S),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sim-rounds", type=int, default=8)
    parser.add_argument("--real-rounds", type=int, default=6)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-sim", action="store_true")
    parser.add_argument(
        "--clean-repeats",
        type=int,
        default=0,
        help="only clean real-peer runs, this many per aggregator (the clean-run cost)",
    )
    parser.add_argument(
        "--same-task",
        action="store_true",
        help="only the simulator's 8/2 group with one task for all (a cluster's case)",
    )
    parser.add_argument(
        "--task-majority",
        action="store_true",
        help="only the simulator's 12/3 group, each attacked task with two honest members",
    )
    parser.add_argument("--only", nargs="+", choices=ATTACKS, help="a subset of the attacks")
    parser.add_argument("--pair", action="store_true", help="only a group of 2, one attacker")
    parser.add_argument(
        "--withholding", action="store_true", help="only withholding, on real peers"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="only 40%% and 50%% hostile (zeros, sign flip)"
    )
    parser.add_argument(
        "--sybils",
        type=int,
        nargs="+",
        help="only one attacker behind this many identities each (e.g. 1 2 4 8), 4 honest",
    )
    parser.add_argument(
        "--sybils-real",
        type=int,
        nargs="+",
        help="only the Sybils on real peers, open and address admission (e.g. 1 2 4 8)",
    )
    parser.add_argument(
        "--sybil-policies",
        nargs="+",
        choices=("open", "address"),
        default=["open", "address"],
        help="with --sybils-real: run these admission policies (the other's saved rows stay)",
    )
    parser.add_argument(
        "--alie-z",
        type=float,
        nargs="+",
        help="only ALIE at these strengths z (the attack's default is 1), groups 8/2 and 12/3",
    )
    parser.add_argument(
        "--outer",
        choices=sorted(OUTERS),
        default="default",
        help="outer optimizer of every run: the product's default (fedavg) or nesterov lr 0.7",
    )
    parser.add_argument("--clip-scale", type=float, help="tuning: CenteredClip's tau factor")
    parser.add_argument("--clip-iterations", type=int, help="tuning: CenteredClip's iterations")
    args = parser.parse_args()
    tuning = {
        key: value
        for key, value in (
            ("clip_scale", args.clip_scale),
            ("clip_iterations", args.clip_iterations),
        )
        if value is not None
    }
    ROBUST.update(tuning)  # a tuning run prints its rows and leaves RESULTS.md alone
    if OUTERS[args.outer]:
        RUN["outer"] = OUTERS[args.outer]
    torch.set_num_threads(1)
    attacks = args.only or ATTACKS
    if args.same_task:
        same_task(attacks, args.sim_rounds, write=not tuning)
        return
    if args.alie_z:
        alie_strength(args.alie_z, args.sim_rounds)
        return
    if args.sybils:
        sybils(args.sybils, args.sim_rounds)
        return
    if args.sybils_real:
        sybils_real(args.sybils_real, args.real_rounds, args.sybil_policies)
        return
    if args.pair:
        pair(args.sim_rounds)
        return
    if args.breakdown:
        breakdown(args.sim_rounds)
        return
    if args.withholding:
        withholding(args.real_rounds)
        return
    if args.task_majority:
        task_majority(attacks, args.sim_rounds, write=not tuning)
        return
    if args.clean_repeats:
        clean_repeats(args.clean_repeats, args.real_rounds)
        return
    results: dict[str, Any] = {"sim": {}, "real": {}}
    for clients, hostile in () if args.skip_sim else ((4, 1), (8, 2)):
        key = f"{clients}/{hostile}"
        results["sim"][key] = {}
        for attack in [None, *attacks]:
            row = {}
            for robust in (False, True):
                row["defended" if robust else "trusting"] = run_sim(
                    clients, hostile, attack, robust, args.sim_rounds
                )
            results["sim"][key][attack or "clean"] = row
            print(f"sim {key} {attack or 'clean'}: {json.dumps(row)}", flush=True)
    if not args.skip_real:
        with tempfile.TemporaryDirectory(prefix="swarmtune-attacks-") as tmp:
            for attack in [None, *attacks]:
                row = {}
                for aggregator in ("mean", "centered-clip"):
                    where = Path(tmp) / f"{attack or 'clean'}-{aggregator}"
                    row[aggregator] = run_real(attack, aggregator, args.real_rounds, where)
                results["real"][attack or "clean"] = row
                print(f"real {attack or 'clean'}: {json.dumps(row)}", flush=True)
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    results["command"] = ".venv/bin/python " + " ".join(["bench/attacks.py", *sys.argv[1:]])
    results["sim_rounds"], results["real_rounds"] = args.sim_rounds, args.real_rounds
    results["outer"] = outer_text()
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    if tuning:
        print(f"tuning run with {tuning}: bench/RESULTS.md left as it is")
        return
    results = _join_saved(results, out / "attacks.json", args)
    (out / "attacks.json").write_text(json.dumps(results, indent=1))
    replace_section("attacks", render(results))
    print(render(results))


def _join_saved(results: dict, path: Path, args: argparse.Namespace) -> dict:
    """A --skip-sim or --skip-real run keeps the other part of the saved results, when they
    were measured with the same outer optimizer; the commands of both are kept."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    if not (args.skip_sim or args.skip_real) or saved.get("outer") != results["outer"]:
        return results
    kept = "sim" if args.skip_sim else "real"
    if not saved.get(kept):
        return results
    ran = "real" if kept == "sim" else "sim"
    if args.only and saved.get(ran):  # a few attacks again: the saved rows of the others stay
        results[ran] = {**saved[ran], **results[ran]}
    results[kept] = saved[kept]
    results[f"{kept}_rounds"] = saved[f"{kept}_rounds"]
    results["command"] = f"{saved['command']}` then `{results['command']}"
    return results


def clean_repeats(count: int, rounds: int) -> None:
    """Clean real-peer runs, `count` per aggregator: eval loss and round wall time."""
    runs: dict[str, list[dict]] = {"mean": [], "centered-clip": []}
    with tempfile.TemporaryDirectory(prefix="swarmtune-clean-") as tmp:
        for rep in range(count):
            for aggregator in runs:
                result = run_real(None, aggregator, rounds, Path(tmp) / f"{aggregator}-{rep}")
                runs[aggregator].append({k: result[k] for k in ("eval_loss", "round_s")})
                print(f"clean {aggregator} {rep}: {runs[aggregator][-1]}", flush=True)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "clean_repeats.json").write_text(json.dumps(runs, indent=1))
    for aggregator, rows in runs.items():
        losses = [r["eval_loss"] for r in rows]
        walls = [r["round_s"] for r in rows]
        print(
            f"{aggregator}: eval {sum(losses) / count:.4f} ({min(losses):.4f}-{max(losses):.4f}),"
            f" round {sum(walls) / count:.2f} s"
        )


def same_task(attacks: list[str], rounds: int, write: bool = True) -> None:
    """8 clients on one task, 2 of them hostile: the group a similarity cluster makes."""
    setting(
        "attacks-same-task",
        attacks,
        rounds,
        (8, 2, TASKS[:1]),
        f"### Simulator, group 8/2, one task ({TASKS[0]}) for every member, {rounds} rounds",
        "What a similarity cluster's group looks like.",
        write,
    )


def task_majority(attacks: list[str], rounds: int, write: bool = True) -> None:
    """12 clients on four tasks, 3 hostile: a quarter of the group, each attacker on a task
    that two honest members train (clients take tasks round robin; the last ones forge)."""
    setting(
        "attacks-task-majority",
        attacks,
        rounds,
        (12, 3, TASKS),
        f"### Simulator, group 12/3, four tasks, each attacker on a task two honest members"
        f" train, {rounds} rounds",
        "A quarter of the group is hostile, as in the 8/2 row above, but no attacked task has"
        " as many attackers as honest members.",
        write,
    )


def setting(
    section: str,
    attacks: list[str],
    rounds: int,
    group: tuple[int, int, list[str]],
    title: str,
    note: str,
    write: bool = True,
) -> None:
    """One extra simulated group (clients, hostile, tasks) under every attack, both
    aggregators; writes its own RESULTS.md section unless `write` is off (a tuning run)."""
    clients, hostile, tasks = group
    rows = {}
    for attack in [None, *attacks]:
        rows[attack or "clean"] = {
            ("defended" if robust else "trusting"): run_sim(
                clients, hostile, attack, robust, rounds, tasks
            )
            for robust in (False, True)
        }
        print(f"{section} {attack or 'clean'}: {json.dumps(rows[attack or 'clean'])}", flush=True)
    clean_t, clean_d = (
        rows["clean"]["trusting"]["eval_loss"],
        rows["clean"]["defended"]["eval_loss"],
    )
    lines = [
        title,
        "",
        f"{note} {reproduce()}",
        "",
        "| attack | trusting mean | defended (norm bound + CenteredClip) |",
        "|---|---|---|",
    ]
    for attack, row in rows.items():
        t, d = row["trusting"]["eval_loss"], row["defended"]["eval_loss"]
        lines.append(
            f"| {attack} | {t:.4f} ({_verdict(t, clean_t)}) | {d:.4f} ({_verdict(d, clean_d)}) |"
        )
    if write:
        replace_section(section, "\n".join(lines))
    print("\n".join(lines))


def _both(clients: int, hostile: int, attack: str | None, rounds: int) -> dict[bool, float]:
    """Final eval loss of one simulated group under the trusting mean (False) and the defended
    default (True)."""
    return {r: run_sim(clients, hostile, attack, r, rounds)["eval_loss"] for r in (False, True)}


def _cells(row: dict[bool, float], clean: dict[bool, float]) -> str:
    """The trusting and defended cells of a table row, each against its clean run."""
    return (
        f"{row[False]:.4f} ({_verdict(row[False], clean[False])}) |"
        f" {row[True]:.4f} ({_verdict(row[True], clean[True])})"
    )


def sybils(counts: list[int], rounds: int, attack: str = "sign-flip") -> None:
    """One person behind 1, 2, 4, 8 identities among 4 honest members (open admission: each
    identity is a member like any other), every one sending `attack`."""
    lines = [
        f"### Sybils under open admission: one attacker, k identities, 4 honest members, {rounds}"
        " rounds (simulator)",
        "",
        f"Every identity sends {attack}; clients take the four tasks round robin. " + reproduce(),
        "",
        "| identities | share of the group | trusting mean | defended (norm bound + CenteredClip) |",
        "|---|---|---|---|",
    ]
    clean = _both(4, 0, None, rounds)
    lines.append(f"| 0 (clean) | 0 | {clean[False]:.4f} | {clean[True]:.4f} |")
    for k in counts:
        row = _both(4 + k, k, attack, rounds)
        print(f"sybils {k}: {json.dumps(row)}", flush=True)
        lines.append(f"| {k} | {k}/{4 + k} | {_cells(row, clean)} |")
    replace_section("attacks-sybils", "\n".join(lines))
    print("\n".join(lines))


SYBIL_HOST = "127.0.0.66"  # every identity of the one attacker: one address (loopback /8)


def run_sybils_real(k: int, policy: str, rounds: int, workdir: Path) -> dict[str, Any]:
    """Real peers: coordinator + 4 honest volunteers, each on its own loopback address
    (127.0.0.11-14; libp2p dials from its listening address, so the coordinator sees each), and
    one attacker with k identities, every one on 127.0.0.66 sending sign-flip. Under `address`
    admission the coordinator hands a ticket to one identity per address; an identity it refuses
    exits at join (exit 2) and never averages."""
    workdir.mkdir(parents=True)
    config = {
        "run_id": "sybil-bench",
        **RUN,
        "averaging": {"matchmaking_time": 5.0, **ROBUST},
        "admission": {"policy": policy},
    }
    parse_config(config)
    (workdir / "run.yaml").write_text(json.dumps(config))
    honest = [workdir / f"honest{i + 1}" for i in range(4)]
    sybils = [workdir / f"sybil{j + 1}" for j in range(k)]
    procs = Processes()
    try:
        maddr = start_coordinator(procs, workdir / "run.yaml", workdir / "c", workdir / "addr")
        common = ["--initial-peers", maddr, "--rounds", str(rounds), "--threads", "1"]
        for j, vol in enumerate(sybils):  # first, so that they are in from round 0
            args = ["--data", f"builtin:{TASKS[j % 4]}", "--workdir", str(vol), *common]
            procs.start(
                vol.name, ["sign-flip", *args, "--host", SYBIL_HOST], program=[str(HOSTILE)]
            )
        for i, vol in enumerate(honest):
            args = ["--data", f"builtin:{TASKS[i]}", "--workdir", str(vol), *common]
            procs.start(vol.name, ["join", *args, "--host", f"127.0.0.{11 + i}", "--wait-for", "4"])
        timeout = 120 + 60 * rounds
        codes = {v.name: procs.procs[v.name].wait(timeout=timeout) for v in honest}
        sybil_codes = [procs.procs[v.name].poll() for v in sybils]
    finally:
        procs.stop_all()
    hostile_ids = {peer_id(v) for v in sybils}
    metrics = [
        [json.loads(x) for x in (v / "metrics.jsonl").read_text().splitlines()] for v in honest
    ]
    finals = [m[-1] for m in metrics if m]
    counted = [  # hostile contributions that entered an honest member's aggregate
        len(hostile_ids & (set(r["members"]) - set(r["excluded"]))) for m in metrics for r in m
    ]
    return {
        "exit_codes": codes,
        "sybils_refused": sum(1 for c in sybil_codes if c == 2),
        "eval_loss": sum(f["eval_loss"] for f in finals) / max(len(finals), 1),
        "averaged": sum(1 for m in metrics for r in m if r["outcome"] == "averaged"),
        "hostile_per_round": max(counted, default=0),
        "rounds": min(len(m) for m in metrics),
    }


SYBILS_REAL = ROOT / "bench" / "out" / "sybils_real.json"


def sybils_real(counts: list[int], rounds: int, policies: list[str]) -> None:
    """The Sybil table on real peers, under `open` and under `address` admission; runs the
    given policies and keeps the other's rows from bench/out/sybils_real.json."""
    saved = json.loads(SYBILS_REAL.read_text()) if SYBILS_REAL.exists() else {}
    rows: dict[str, dict[int, dict[str, Any]]] = {
        policy: {int(k): row for k, row in saved.get(policy, {}).items()}
        for policy in ("open", "address")
    }
    with tempfile.TemporaryDirectory(prefix="swarmtune-sybils-") as tmp:
        for policy in policies:
            rows[policy] = {}
            for k in [0, *counts]:
                rows[policy][k] = run_sybils_real(k, policy, rounds, Path(tmp) / f"{policy}-{k}")
                print(f"sybils {policy} {k}: {json.dumps(rows[policy][k])}", flush=True)
                SYBILS_REAL.parent.mkdir(parents=True, exist_ok=True)
                SYBILS_REAL.write_text(json.dumps(rows, indent=1))
    lines = [
        f"### Sybils on real peers: one attacker, k identities, 4 honest volunteers, {rounds}"
        " rounds",
        "",
        "Coordinator + 4 honest volunteers (one built-in task each, each on its own loopback"
        " address) + k identities of one attacker, all on one address, each sending sign-flip;"
        " the defended default. `open`: every identity is a member; `address`"
        " (`identities_per_address: 1`): the coordinator hands one ticket per address, the other"
        f" identities are refused at join. {reproduce()}",
        "",
        "| identities | open: honest eval | open: hostile members per round | address: honest"
        " eval | address: identities refused | address: hostile members per round |",
        "|---|---|---|---|---|---|",
    ]
    for k in [0, *counts]:
        o, a = rows["open"][k], rows["address"][k]
        cells = [
            f"{o['eval_loss']:.4f} ({_verdict(o['eval_loss'], rows['open'][0]['eval_loss'])})",
            str(o["hostile_per_round"]),
            f"{a['eval_loss']:.4f} ({_verdict(a['eval_loss'], rows['address'][0]['eval_loss'])})",
            f"{a['sybils_refused']} of {k}",
            str(a["hostile_per_round"]),
        ]
        lines.append(f"| {k or '0 (clean)'} | " + " | ".join(cells) + " |")
    replace_section("attacks-sybils-real", "\n".join(lines))
    print("\n".join(lines))


def breakdown(rounds: int, attacks: tuple[str, ...] = ("zeros", "sign-flip")) -> None:
    """Where the default rule breaks: 2 and 3 identities of one person among 3 honest members
    (40% and 50% of the group), each sending `attacks`."""
    lines = [
        f"### Breakdown: 40% and 50% of a group hostile, 3 honest members, {rounds} rounds"
        " (simulator)",
        "",
        "Every hostile identity sends the same attack; clients take the four tasks round robin."
        + f" {reproduce()}",
        "",
        "| attack | hostile | trusting mean | defended (norm bound + CenteredClip) |",
        "|---|---|---|---|",
    ]
    clean = _both(3, 0, None, rounds)
    lines.append(f"| clean | 0/3 | {clean[False]:.4f} | {clean[True]:.4f} |")
    for attack in attacks:
        for k in (2, 3):
            row = _both(3 + k, k, attack, rounds)
            print(f"breakdown {attack} {k}: {json.dumps(row)}", flush=True)
            lines.append(f"| {attack} | {k}/{3 + k} | {_cells(row, clean)} |")
    replace_section("attacks-breakdown", "\n".join(lines))
    print("\n".join(lines))


def pair(rounds: int) -> None:
    """A group of 2: one honest member and one attacker, for every attack (any rule is 50/50),
    trusting, defended, and defended with min_group_size 3 (the pair applies no update)."""
    columns = {
        "trusting": {"robust": False},
        "defended": {"robust": True},
        "min_group_size 3": {"robust": True, "least": 3},
    }
    rows = {}
    for attack in [None, *ATTACKS]:
        rows[attack or "clean"] = {
            name: run_sim(2, 1, attack, rounds=rounds, tasks=TASKS[:1], **kw)  # type: ignore[arg-type]
            for name, kw in columns.items()
        }
        print(f"pair {attack or 'clean'}: {json.dumps(rows[attack or 'clean'])}", flush=True)
    honest_alone = run_sim(1, 0, None, True, rounds, TASKS[:1])["eval_loss"]
    clean = {name: rows["clean"][name]["eval_loss"] for name in columns}
    lines = [
        f"### Simulator, a group of 2 (one honest member, one attacker), one task, {rounds} rounds",
        "",
        "No rule that sees only one round can tell the two apart (docs/design.md, 8. Trust):"
        " `min_group_size: 3` makes such a pair apply no update at all. Clean: two honest"
        f" members. The honest member training alone reaches {honest_alone:.4f}."
        + f" {reproduce()}",
        "",
        "| attack | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for attack, row in rows.items():
        cells = [
            f"{row[n]['eval_loss']:.4f} ({_verdict(row[n]['eval_loss'], clean[n])})"
            for n in columns
        ]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    replace_section("attacks-pair", "\n".join(lines))
    print("\n".join(lines))


def withholding(rounds: int) -> None:
    """Real peers: a volunteer that commits in matchmaking and never serves its contribution,
    against the clean run (coordinator + 3 honest + 1 hostile or honest, defended default)."""
    rows = {}
    with tempfile.TemporaryDirectory(prefix="swarmtune-withholding-") as tmp:
        for attack in (None, "withholding"):
            name = attack or "clean"
            rows[name] = run_real(attack, "centered-clip", rounds, Path(tmp) / name)
            print(f"withholding {name}: {json.dumps(rows[name])}", flush=True)
    lines = [
        f"### Withholding on real peers: {rounds} rounds, coordinator + 3 honest + 1",
        "",
        "The hostile volunteer commits to its contribution in matchmaking and never serves it."
        + f" {reproduce()}",
        "",
        "| run | honest mean eval | rounds averaged (of 3 x rounds) | exclusions | mean round s"
        f" | mean exchange s | exchanges that waited {REVEAL_WAIT_S:g} s or more |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['eval_loss']:.4f} | {row['averaged']} | {row['excluded']} |"
            f" {row['round_s']:.2f} | {row['transfer_s']:.2f} | {row['full_waits']} |"
        )
    replace_section("attacks-withholding", "\n".join(lines))
    print("\n".join(lines))


def alie_strength(zs: list[float], rounds: int) -> None:
    """ALIE at several z in the 8/2 group (an attacker on each task with one honest member) and
    the 12/3 group (two honest members per attacked task): where does the plain mean fail?"""
    groups = {"8/2": (8, 2), "12/3": (12, 3)}
    lines = [
        f"### ALIE's strength z, simulator, {rounds} rounds",
        "",
        "The forgery is the honest mean minus z standard deviations per coordinate (ALIE's"
        " default here is z = 1). Groups as in the 8/2 and 12/3 tables above." + f" {reproduce()}",
        "",
        "| group | z | trusting mean | defended (norm bound + CenteredClip) | defended:"
        " contributions excluded |",
        "|---|---|---|---|---|",
    ]
    for label, (clients, hostile) in groups.items():
        clean = {
            robust: run_sim(clients, hostile, None, robust, rounds)["eval_loss"]
            for robust in (False, True)
        }
        lines.append(f"| {label} | clean | {clean[False]:.4f} | {clean[True]:.4f} | 0 |")
        for z in zs:
            row = {
                robust: run_sim(clients, hostile, "alie", robust, rounds, adversary=ALIE(z))
                for robust in (False, True)
            }
            t, d = row[False]["eval_loss"], row[True]["eval_loss"]
            lines.append(
                f"| {label} | {z:g} | {t:.4f} ({_verdict(t, clean[False])}) |"
                f" {d:.4f} ({_verdict(d, clean[True])}) | {row[True]['excluded']} |"
            )
            print(lines[-1], flush=True)
    replace_section("attacks-alie-strength", "\n".join(lines))
    print("\n".join(lines))


def _verdict(loss: float, clean: float) -> str:
    return f"{100 * (loss / clean - 1):+.1f}%"


def render(res: dict) -> str:
    """The RESULTS.md section."""
    lines = [
        "## Attacks: trusting mean vs the defended default (bench/attacks.py)",
        "",
        f"Measured on {res['machine']}. Reproduce: `{res['command']}`",
        "",
        "Eval loss after the last round, and its change against the clean run of the same"
        " aggregator. The goal: defended within 5% of clean under every attack, while the"
        f" undefended column visibly fails. Every run: {outer_text()}.",
    ]
    for key, rows in res["sim"].items():
        clean_t, clean_d = rows["clean"]["trusting"], rows["clean"]["defended"]
        lines += [
            "",
            f"### Simulator, group {key} (attackers), {res['sim_rounds']} rounds,"
            " the daemon's round code",
            "",
            "| attack | trusting mean | defended (norm bound + CenteredClip) | defended rounds averaged"
            " / not | contributions excluded | aggregation ms (trusting / defended) |",
            "|---|---|---|---|---|---|",
        ]
        for attack, row in rows.items():
            t, d = row["trusting"], row["defended"]
            lines.append(
                f"| {attack} | {t['eval_loss']:.4f} ({_verdict(t['eval_loss'], clean_t['eval_loss'])})"
                f" | {d['eval_loss']:.4f} ({_verdict(d['eval_loss'], clean_d['eval_loss'])})"
                f" | {d['averaged']} / {d['rejected']} | {d['excluded']}"
                f" | {1000 * t['aggregate_s']:.1f} / {1000 * d['aggregate_s']:.1f} |"
            )
    if res["real"]:
        clean = res["real"]["clean"]
        lines += [
            "",
            f"### Real peers on loopback, group 4/1, {res['real_rounds']} rounds",
            "",
            "Coordinator + 3 honest volunteers + 1 volunteer run by bench/hostile_join.py (the"
            " honest 4th volunteer in the clean row); token admission; the weight bound and"
            " the exchange's checks are on for both aggregators. Eval loss = mean of the 3"
            " honest volunteers.",
            "",
            "| attack | plain mean | default (norm bound + CenteredClip) | rounds averaged / not"
            " (mean, default) | excluded"
            " (mean, default) | joins refused (mean, default) | resyncs (mean, default)"
            " | round s (mean, default) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for attack, row in res["real"].items():
            m, c = row["mean"], row["centered-clip"]
            lines.append(
                f"| {attack} | {m['eval_loss']:.4f} ({_verdict(m['eval_loss'], clean['mean']['eval_loss'])})"
                f" | {c['eval_loss']:.4f} ({_verdict(c['eval_loss'], clean['centered-clip']['eval_loss'])})"
                f" | {m['averaged']}/{m['not_averaged']}, {c['averaged']}/{c['not_averaged']}"
                f" | {m['excluded']}, {c['excluded']} | {m['refused']}, {c['refused']}"
                f" | {m['resyncs']}, {c['resyncs']}"
                f" | {m['round_s']:.1f}, {c['round_s']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
