"""Benchmark: strangers who only announce (docs/design.md, 8. Trust, "States carry proof").

Real peers on 127.0.0.1: a coordinator and 3 honest volunteers on the product's default config,
and bench/forger.py (started with them; it forges from the first honest state on), which
announces every honest state
with its adapter negated (lora_B x -3), N rounds ahead, under a round certificate only it
signed, and offers that adapter as `global` at round 1,000,000. Each attack runs with the
honest volunteers as shipped ("defended") and as they were before round certificates
("trusting": bench/trusting_join.py, a state adopted on one vote, and bench/trusting_pull.py,
the newest offer pulled). Per row: the honest
volunteers' mean final eval loss; how many adopted a forged state; what `pull` served (its
round, and whether its tensors are the honest state's); the mean wall time of a round.

Run:  .venv/bin/python bench/state_attacks.py [--rounds 12]
Writes bench/out/state_attacks.json and the `state-attacks` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from results_md import replace_section  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from swarmtune.node.adapters.adapter import adapter_digest  # noqa: E402
from swarmtune.node.engine.state import decode_state  # noqa: E402
from swarmtune.node.local.data import BUILTIN_TASKS  # noqa: E402
from swarmtune.node.roles.demo import Processes, start_coordinator  # noqa: E402

TASKS = list(BUILTIN_TASKS[:3])
CONFIG = {
    "run_id": "state-attacks",
    "inner": {"steps": 10, "batch_size": 8, "seq_len": 48},
    "averaging": {"matchmaking_time": 2.0},
}
ATTACKS: dict[str, list[str]] = {
    "forged state 3 rounds ahead": ["--ahead", "3"],
    "forged state 1 round ahead": ["--ahead", "1"],
    "announced, nothing served": ["--ahead", "3", "--no-serve"],
}


def _metrics(vol: Path) -> list[dict]:
    path = vol / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def run(attack: str | None, defended: bool, rounds: int, workdir: Path) -> dict[str, Any]:
    """One run; the row's numbers."""
    workdir.mkdir(parents=True)
    (workdir / "run.yaml").write_text(json.dumps(CONFIG))
    procs = Processes()
    forged: list[dict] = []
    try:
        maddr = start_coordinator(procs, workdir / "run.yaml", workdir / "c", workdir / "addr")
        vols = [workdir / f"vol{i + 1}" for i in range(len(TASKS))]
        if attack is not None:  # it starts slower than a volunteer, and forges as soon as it can
            forger_args = ["--initial-peers", maddr, "--run", CONFIG["run_id"]]
            forger_args += ["--workdir", str(workdir / "forger"), *ATTACKS[attack]]
            forger_args += ["--out", str(workdir / "forger.jsonl")]
            procs.start("forger", forger_args, program=[str(ROOT / "bench" / "forger.py")])
        for task, vol in zip(TASKS, vols, strict=True):
            args = ["--initial-peers", maddr, "--data", f"builtin:{task}", "--workdir", str(vol)]
            args += ["--rounds", str(rounds), "--threads", "1", "--wait-for", str(len(vols))]
            if defended:
                procs.start(vol.name, ["join", *args])
            else:
                procs.start(vol.name, args, program=[str(ROOT / "bench" / "trusting_join.py")])
        codes = [procs.procs[v.name].wait(timeout=120 + 40 * rounds) for v in vols]
        time.sleep(1.5)  # the forger announces a forgery of the last state too
        out = workdir / "pulled"
        # the undefended side pulls as `pull` did before round certificates
        program = (
            ["-m", "swarmtune.cli", "pull"]
            if defended
            else [str(ROOT / "bench" / "trusting_pull.py")]
        )
        pulled = subprocess.run(
            [sys.executable, *program, "--initial-peers", maddr, "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    finally:
        procs.stop_all()
    if (workdir / "forger.jsonl").exists():
        lines = (workdir / "forger.jsonl").read_text().splitlines()
        forged = [f for f in map(json.loads, lines) if "digest" in f]
    if attack is not None and not forged:  # a silent no-show is no attack
        raise RuntimeError(f"the forger announced nothing ({attack}): see its output above")
    forged_digests = {f["digest"] for f in forged}
    metrics = [_metrics(v) for v in vols]
    finals = [m[-1] for m in metrics if m]
    states = [decode_state((v / "state.safetensors").read_bytes()) for v in vols]
    # a volunteer adopted a forgery when a round of it started from one, or it ended on one
    adopted = sum(
        1
        for m, s in zip(metrics, states, strict=True)
        if s.digest() in forged_digests or any(r["start_digest"] in forged_digests for r in m)
    )
    if pulled.returncode == 0:
        tensors = load_file(out / "adapter_model.safetensors")
        # the adapters of the volunteers' final states, unless a state is a forgery (trusting
        # volunteers may end on one, and then the forger's offer matches their adapter)
        honest = {adapter_digest(s.params) for s in states if s.digest() not in forged_digests}
        found = re.search(r"round (\d+),", pulled.stdout)
        served = "honest" if adapter_digest(tensors) in honest else "not an honest state's"
        served += f", round {found.group(1) if found else '?'}"
    else:
        served = f"failed: {pulled.stderr.strip()[-120:]}"
    return {
        "exit_codes": codes,
        "eval_loss": sum(f["eval_loss"] for f in finals) / max(len(finals), 1),
        "adopted_forged": adopted,
        "resyncs": sum(f["resyncs"] for f in finals),
        "fallbacks": sum(f["fallbacks"] for f in finals),
        "unproven": sum(f.get("unproven", 0) for f in finals),
        "pull": served,
        "pull_stdout": pulled.stdout.strip()[-300:],
        "round_s": sum(r["wall_s"] for m in metrics for r in m) / max(sum(map(len, metrics)), 1),
        "forgeries": len(forged),
    }


def render(results: dict) -> str:
    """The RESULTS.md section."""
    lines = [
        "### Strangers who only announce: forged states and offers (real peers)",
        "",
        f"Coordinator + {len(TASKS)} honest volunteers ({', '.join(TASKS)}), default config,"
        f" {results['rounds']} rounds; bench/forger.py starts with them. `{results['command']}`"
        f" on {results['machine']}.",
        "",
        "| attack | volunteers | eval loss (mean) | adopted a forged state | resyncs | no-group rounds | `pull` served | s / round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for attack, row in results["rows"].items():
        for side, r in row.items():
            lines.append(
                f"| {attack} | {side} | {r['eval_loss']:.3f} | {r['adopted_forged']} of"
                f" {len(TASKS)} | {r['resyncs']} | {r['fallbacks']} | {_short(r['pull'])} |"
                f" {r['round_s']:.2f} |"
            )
    lines += [
        "",
        "Resyncs and no-group rounds are summed over the three volunteers (12 rounds each)."
        " The forger runs on the same two cores as the swarm: the seconds per round under"
        " attack include its own CPU.",
    ]
    return "\n".join(lines)


def _short(pull: str) -> str:
    """The `pull` cell: what was served, or why nothing was."""
    if "unknown blob" in pull:
        return "nothing: the newest offer's provider does not serve it"
    return pull if len(pull) < 80 else pull[:77] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--only", nargs="+", choices=sorted(ATTACKS))
    parser.add_argument(
        "--render", action="store_true", help="only rewrite RESULTS.md from the saved JSON"
    )
    args = parser.parse_args()
    saved = ROOT / "bench" / "out" / "state_attacks.json"
    if args.render:
        replace_section("state-attacks", render(json.loads(saved.read_text())))
        return
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="swarmtune-state-attacks-") as tmp:
        rows["clean"] = {"defended": run(None, True, args.rounds, Path(tmp) / "clean")}
        print(f"clean: {json.dumps(rows['clean'])}", flush=True)
        for attack in args.only or ATTACKS:
            rows[attack] = {}
            for defended in (True, False):
                side = "defended" if defended else "trusting"
                where = Path(tmp) / f"{attack.replace(' ', '-')}-{side}"
                rows[attack][side] = run(attack, defended, args.rounds, where)
            print(f"{attack}: {json.dumps(rows[attack])}", flush=True)
    results = {
        "rows": rows,
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": ".venv/bin/python " + " ".join(["bench/state_attacks.py", *sys.argv[1:]]),
    }
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "state_attacks.json").write_text(json.dumps(results, indent=1))
    replace_section("state-attacks", render(results))
    print(render(results))


if __name__ == "__main__":
    main()
