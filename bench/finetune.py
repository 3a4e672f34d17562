"""Real fine-tuning: a pretrained model, three real tasks, and four ways to spend the same steps.

The base is SmolLM2-135M-Instruct (`bench/make_smollm2.py --out DIR`, passed as --model). The
tasks are chat records built from data that ships on this machine, written by nobody here:
- codes: "What is the ISO 3166 alpha-3 code of Germany?" -> "DEU" (Debian iso-codes,
  /usr/share/iso-codes/json/iso_3166-1.json);
- german: "What is Germany called in German?" -> "Deutschland" (the iso-codes German
  translations, /usr/share/locale/de/LC_MESSAGES/iso_3166-1.mo);
- unicode: "What is the Unicode name of the character 'é'?" -> "LATIN SMALL LETTER E WITH
  ACUTE" (the Unicode Character Database shipped in CPython's unicodedata).
One example in five is held out. Compared, each scored by `swarmtune eval` on every task's
held-out examples: the base model; each volunteer alone (the same inner loop, its own task,
the same steps); the swarm's pulled adapter (a coordinator and one volunteer per task on
loopback, real processes); one centralized run on the pooled data with the swarm's total steps.
Then steps/s and peak memory of fp32 and bf16 autocast, gradient checkpointing off and on, at
max_length 512.

Run:  .venv/bin/python bench/finetune.py --model /tmp/smollm2-135m [--rounds 6] [--steps 10]
      [--outer NAME[:LR[:MOMENTUM]] ...] [--weight steps|tokens] [--workdir DIR]
With --workdir, a rerun reuses the adapters and scores already there and adds a row for each
new swarm run (outer optimizer and weight), so they are compared side by side.
Writes bench/out/finetune.json and the `finetune` section of bench/RESULTS.md (not --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import gettext
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_md import replace_section  # noqa: E402

OUT = ROOT / "bench" / "out" / "finetune.json"
ISO = Path("/usr/share/iso-codes/json/iso_3166-1.json")
GERMAN = Path("/usr/share/locale/de/LC_MESSAGES/iso_3166-1.mo")
TASKS = ("codes", "german", "unicode")
HELD_OUT = 5  # one example in five
INNER = {"batch_size": 4, "seq_len": 128, "lr": 0.001}


def chat(question: str, answer: str) -> dict[str, Any]:
    turns = [("user", question), ("assistant", answer)]
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def task_rows() -> dict[str, list[dict[str, Any]]]:
    """Every task's records, in a fixed order."""
    countries = json.loads(ISO.read_text())["3166-1"]
    with GERMAN.open("rb") as handle:
        german = gettext.GNUTranslations(handle)
    chars = [chr(c) for c in range(0xC0, 0x250)] + [chr(c) for c in range(0x391, 0x3CA)]
    return {
        "codes": [
            chat(f"What is the ISO 3166 alpha-3 code of {c['name']}?", c["alpha_3"])
            for c in countries
        ],
        "german": [
            chat(f"What is {c['name']} called in German?", german.gettext(c["name"]))
            for c in countries
            if german.gettext(c["name"]) != c["name"]
        ],
        "unicode": [
            chat(f"What is the Unicode name of the character '{ch}'?", unicodedata.name(ch))
            for ch in chars
            if unicodedata.name(ch, "")
        ],
    }


def write_tasks(folder: Path) -> dict[str, dict[str, Any]]:
    """train/held-out jsonl per task, and the pooled training file."""
    folder.mkdir(parents=True, exist_ok=True)
    info, pooled = {}, []
    for task, rows in task_rows().items():
        train = [r for i, r in enumerate(rows) if i % HELD_OUT]
        held = rows[::HELD_OUT]
        for name, part in (("train", train), ("eval", held)):
            (folder / f"{task}-{name}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in part)
            )
        pooled += train
        info[task] = {"train": len(train), "eval": len(held)}
    (folder / "pooled-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pooled))
    return info


def run_config(
    model: str, steps: int, matchmaking: float = 5.0, swarm: Swarm | None = None
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "run_id": "finetune-bench",
        "base_model": model,
        "inner": {"steps": steps, **INNER},
        "averaging": {"matchmaking_time": matchmaking},
    }
    if swarm is not None:
        config["outer"] = swarm.outer
        config["averaging"]["weight"] = swarm.weight
    return config


class Swarm:
    """One way to run the swarm: its outer optimizer (`NAME[:LR[:MOMENTUM]]`, e.g. `fedavg`,
    `nesterov:0.7:0.9`) and its members' weight (`steps` or `tokens`)."""

    def __init__(
        self, outer: str, weight: str, matchmaking: float, rounds: int = 6, steps: int = 10
    ) -> None:
        name, *numbers = outer.split(":")
        self.outer: dict[str, Any] = {"name": name}
        for field, value in zip(("lr", "momentum"), numbers, strict=False):
            self.outer[field] = float(value)
        self.weight, self.matchmaking = weight, matchmaking
        self.key = "-".join([outer.replace(":", "-"), weight, f"mm{matchmaking:g}"])
        # the same steps per volunteer cut into other rounds (the default 6 x 10 keeps the key
        # and label it had before the shape was recorded)
        self.shape = "" if (rounds, steps) == (6, 10) else f"{rounds} rounds of H={steps}"
        if self.shape:
            self.key += f"-r{rounds}h{steps}"

    def label(self) -> str:
        from swarmtune.node.config import OuterSettings  # noqa: PLC0415

        outer = OuterSettings.model_validate(self.outer)
        return f"{outer.label()}, weight {self.weight}" + (f", {self.shape}" if self.shape else "")


def train_alone(
    model: str, data: Path, steps: int, out: Path, precision: str = "fp32"
) -> dict[str, Any]:
    """The volunteer's inner loop with no swarm: `steps` AdamW steps, then save the adapter."""
    from swarmtune.node.config import parse_config  # noqa: PLC0415
    from swarmtune.node.local.build import build_local_model  # noqa: PLC0415

    config = parse_config(run_config(model, steps))
    local = build_local_model(config, str(data), model_path=model, data_seed=1, precision=precision)
    start = time.perf_counter()
    result = local.trainer.train_steps(steps)
    seconds = time.perf_counter() - start
    local.model.save_pretrained(str(out))
    return {"loss_first": result.loss_first, "loss_last": result.loss_last, "seconds": seconds}


def run_swarm(
    model: str, folder: Path, rounds: int, steps: int, work: Path, swarm: Swarm
) -> tuple[Path, dict[str, Any]]:
    """Coordinator + one volunteer per task as processes: (the pulled adapter's dir, each
    volunteer's round outcomes)."""
    from swarmtune.node.roles.demo import Processes, start_swarm  # noqa: PLC0415

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "run.yaml").write_text(json.dumps(run_config(model, steps, swarm.matchmaking, swarm)))
    data = [str(folder / f"{t}-train.jsonl") for t in TASKS]
    extra = ("--model", model, "--wait-for", str(len(TASKS)), "--eval-every", str(rounds))
    procs = Processes()
    try:
        maddr, vols = start_swarm(procs, work / "run.yaml", work, data, rounds, extra)
        codes = [procs.procs[v.name].wait() for v in vols]
        assert not any(codes), f"volunteers failed: {codes}"
        out = work / "pulled"
        cli = [
            sys.executable,
            "-m",
            "swarmtune.cli",
            "pull",
            "--initial-peers",
            maddr,
            "--out",
            str(out),
        ]
        subprocess.run(cli, check=True, cwd=ROOT)
    finally:
        procs.stop_all()
    outcomes = {}
    for task, vol in zip(TASKS, vols, strict=True):
        reports = [json.loads(x) for x in (vol / "metrics.jsonl").read_text().splitlines()]
        outcomes[task] = [r["outcome"] for r in reports]
    return out, outcomes


def score_all(
    model: str, adapters: dict[str, Path], folder: Path, cache: Path
) -> tuple[dict, dict]:
    """Every adapter (and the base) on every task's held-out file, with `swarmtune eval`'s own
    scoring (node/roles/evaluator.py), the base loaded once: (scores, samples). An adapter
    whose file has not changed since `cache` scored it is not scored again."""
    from peft import PeftModel  # noqa: PLC0415

    from swarmtune.node.local.basemodel import load_base  # noqa: PLC0415
    from swarmtune.node.local.evaluate import scoring_set  # noqa: PLC0415
    from swarmtune.node.local.sources import load_examples  # noqa: PLC0415
    from swarmtune.node.roles.evaluator import BATCH, score  # noqa: PLC0415

    def stamp(adapter: Path | None) -> str:
        if adapter is None:
            return f"base {model}"
        return f"{adapter} {(adapter / 'adapter_model.safetensors').stat().st_mtime_ns}"

    runs: dict[str, Path | None] = {"base model": None, **adapters}
    kept = json.loads(cache.read_text()) if cache.exists() else {}
    scores: dict[str, dict[str, Any]] = {name: {} for name in runs}
    samples: dict[str, Any] = {}
    for name, adapter in list(runs.items()):
        if stamp(adapter) in kept:
            scores[name] = kept[stamp(adapter)]["scores"]
            samples.update({f"{name} / {t}": v for t, v in kept[stamp(adapter)]["samples"].items()})
            del runs[name]
    base, tokenizer, _ = load_base(model)
    for task in TASKS if runs else ():
        examples = load_examples(str(folder / f"{task}-eval.jsonl"))
        renderer, batches, _ = scoring_set(tokenizer, examples, 512, BATCH)
        for name, adapter in runs.items():
            scored = base if adapter is None else PeftModel.from_pretrained(base, str(adapter))
            result = score(scored.eval(), renderer, examples, batches)
            if adapter is not None:
                base = scored.unload()  # the plain base again, for the next adapter
            scores[name][task] = {"loss": result.loss, "exact": result.exact}
            samples[f"{name} / {task}"] = [s.__dict__ for s in result.samples[:3]]
            print(name, task, scores[name][task], flush=True)
    for name, adapter in runs.items():
        mine = {t: samples[f"{name} / {t}"] for t in TASKS}
        kept[stamp(adapter)] = {"scores": scores[name], "samples": mine}
    cache.write_text(json.dumps(kept))
    return scores, samples


def speed_probe(model: str, data: str, precision: str, checkpointing: bool, steps: int) -> None:
    """One configuration in a process of its own (peak RSS is per process): prints JSON."""
    import torch  # noqa: PLC0415

    from swarmtune.node.config import parse_config  # noqa: PLC0415
    from swarmtune.node.local.build import build_local_model  # noqa: PLC0415

    inner = {**INNER, "seq_len": 512, "gradient_checkpointing": checkpointing}
    config = parse_config({"run_id": "speed", "inner": {"steps": steps, **inner}})
    local = build_local_model(config, data, model_path=model, precision=precision)
    local.trainer.train_steps(1)  # warm-up
    start = time.perf_counter()
    result = local.trainer.train_steps(steps)
    rate = steps / (time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    evaluated = local.eval_loss()
    print(json.dumps({"steps_per_s": rate, "peak_rss_gib": peak, "eval_loss": evaluated,
                      "tokens_per_step": result.tokens / steps, "threads": torch.get_num_threads()}))  # fmt: skip


def speeds(model: str, data: Path, steps: int) -> list[dict[str, Any]]:
    rows = []
    for precision in ("fp32", "bf16"):
        for checkpointing in (False, True):
            cli = [sys.executable, __file__, "--speed-probe", precision, str(int(checkpointing))]
            cli += ["--model", model, "--data", str(data), "--steps", str(steps)]
            done = subprocess.run(cli, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"precision": precision, "checkpointing": checkpointing, **row})
            print(rows[-1], flush=True)
    return rows


def render(data: dict[str, Any]) -> str:
    tasks = data["tasks"]
    lines = [
        "## Real fine-tuning: SmolLM2, three real tasks (bench/finetune.py)",
        "",
        f"Measured {data['date']} on {data['machine']}; command: `{data['command']}`.",
        f"Base {data['model']}; LoRA r=8 on all projections; inner AdamW lr {INNER['lr']}, "
        f"batch {INNER['batch_size']} rows of {INNER['seq_len']} tokens (whole examples "
        f"packed), completion-only loss, chat template; {data['rounds'] * data['steps']} steps"
        " per volunteer (swarm rows: 6 rounds of H=10 unless the row says otherwise). Held-out "
        "examples per task: "
        + ", ".join(f"{t} {tasks[t]['eval']} (train {tasks[t]['train']})" for t in TASKS)
        + ". Exact: the greedy completion begins with the reference answer.",
        "",
        "| adapter | " + " | ".join(f"{t} exact | {t} loss" for t in TASKS) + " | mean exact |",
        "|---|" + "---|---|" * len(TASKS) + "---|",
    ]
    for name, per_task in data["scores"].items():
        cells = [f"{per_task[t]['exact']:.1%} | {per_task[t]['loss']:.3f}" for t in TASKS]
        mean = sum(per_task[t]["exact"] for t in TASKS) / len(TASKS)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.1%} |")
    for swarm in data["runs"].get("swarms", {}).values():
        rounds = swarm["rounds"]
        counted = [
            f"{t} " + ", ".join(f"{n} {o}" for o, n in sorted(Counter(rounds[t]).items()))
            for t in TASKS
        ]
        lines += [
            "",
            f"Swarm {swarm['label']} (matchmaking_time {swarm['matchmaking']:g} s, default "
            f"aggregator), {swarm['seconds']:.0f} s: rounds per volunteer "
            + "; ".join(counted)
            + ".",
        ]
    lines += [
        "",
        "Speed at max_length 512 (rows of 512 packed tokens, batch 4), one process each, "
        "torch threads as shown:",
        "",
        "| precision | checkpointing | steps/s | peak RSS GiB | eval loss | threads |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["speed"]:
        lines.append(
            f"| {r['precision']} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['steps_per_s']:.3f} | {r['peak_rss_gib']:.2f} | {r['eval_loss']:.4f} | "
            f"{r['threads']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SmolLM2 dir from bench/make_smollm2.py")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="H, inner steps per round")
    parser.add_argument("--speed-steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 steps; no RESULTS")
    parser.add_argument(
        "--matchmaking",
        type=float,
        default=30.0,
        help="averaging.matchmaking_time: how long members wait for each other (three volunteers"
        " on 2 shared cores finish H steps up to ~30 s apart)",
    )
    parser.add_argument(
        "--outer",
        action="append",
        help="the swarm's outer optimizer, NAME[:LR[:MOMENTUM]] (e.g. nesterov:0.7:0.9); give it"
        " again for another swarm run beside it (default: the run config's, fedavg)",
    )
    parser.add_argument(
        "--weight",
        choices=("steps", "tokens"),
        default="steps",
        help="averaging.weight of the swarm runs",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep data, adapters and speeds here; a rerun reuses them"
    )
    parser.add_argument("--speed-probe", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed_probe:
        speed_probe(
            args.model, args.data, args.speed_probe[0], args.speed_probe[1] == "1", args.steps
        )
        return
    if args.quick:
        args.rounds, args.steps, args.speed_steps = 1, 2, 1
    total = args.rounds * args.steps
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="finetune-")))
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        tasks = write_tasks(work / "data")
        print("tasks:", tasks, flush=True)
        saved = work / "runs.json"  # what earlier runs in --workdir measured (their adapters stay)
        runs: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
        adapters: dict[str, Path] = {}
        jobs = [(f"alone-{t}", f"{t}-train.jsonl", total, "fp32") for t in TASKS]
        jobs.append(("central", "pooled-train.jsonl", total * len(TASKS), "fp32"))
        # bf16 autocast over a whole run: the codes volunteer again, same data order and steps
        jobs.append(("alone-codes-bf16", "codes-train.jsonl", total, "bf16"))
        for key, data_file, steps, precision in jobs:
            out = work / key
            if key in runs and runs[key].get("steps", steps) != steps:
                raise SystemExit(
                    f"bench/finetune.py: {out} was trained for {runs[key]['steps']} steps, this"
                    f" run needs {steps} (rounds x steps must stay the same in one --workdir)"
                )
            if not (key in runs and (out / "adapter_model.safetensors").exists()):
                runs[key] = train_alone(
                    args.model, work / "data" / data_file, steps, out, precision
                ) | {"steps": steps}
                saved.write_text(json.dumps(runs))
            print(key, runs[key], flush=True)
            name = "centralized, pooled data" if key == "central" else f"{key[6:]} volunteer alone"
            if precision != "fp32":
                name = f"codes volunteer alone, {precision} autocast"
            adapters[f"{name} ({steps} steps)"] = out
        swarms = runs.setdefault("swarms", {})  # every swarm run kept in --workdir, side by side
        for outer in args.outer or ["fedavg"]:
            swarm = Swarm(outer, args.weight, args.matchmaking, args.rounds, args.steps)
            pulled = work / f"swarm-{swarm.key}" / "pulled"
            if swarm.key in swarms and (pulled / "adapter_model.safetensors").exists():
                continue
            started = time.perf_counter()
            pulled, outcomes = run_swarm(
                args.model, work / "data", args.rounds, args.steps, pulled.parent, swarm
            )
            swarms[swarm.key] = {"label": swarm.label(), "rounds": outcomes,
                                 "seconds": time.perf_counter() - started,
                                 "matchmaking": args.matchmaking}  # fmt: skip
            saved.write_text(json.dumps(runs))
        for key, swarm_run in swarms.items():
            name = f"swarm, pulled, {swarm_run['label']} ({len(TASKS)} x {total} steps)"
            adapters[name] = work / f"swarm-{key}" / "pulled"
        scores, samples = score_all(args.model, adapters, work / "data", work / "scores.json")
        speed_file = work / "speed.json"
        if speed_file.exists():
            speed = json.loads(speed_file.read_text())
        else:
            speed = speeds(args.model, work / "data" / "pooled-train.jsonl", args.speed_steps)
            speed_file.write_text(json.dumps(speed))
    data = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, no GPU",
        "command": "bench/finetune.py " + " ".join(sys.argv[1:]),
        "model": Path(args.model).name,
        "rounds": args.rounds,
        "steps": args.steps,
        "matchmaking": args.matchmaking,
        "tasks": tasks,
        "scores": scores,
        "runs": runs,
        "samples": samples,
        "speed": speed,
    }
    print(render(data))
    if not args.quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(data, indent=2))
        replace_section("finetune", render(data))


if __name__ == "__main__":
    main()
