"""QLoRA on CPU: peak memory and inner steps per second, fp32 base vs NF4 (with and without
double quantization), on the embedded base and on a real model dir given by --model.

    .venv/bin/python bench/qlora.py [--model /tmp/smollm2-135m] [--steps 20] [--write]

Each setting runs in its own process: build the local model (base + LoRA on every projection
+ data; peak and resident memory from /proc/self/status), reset the peak (clear_refs 5), 2
warm-up steps, then --steps timed AdamW steps (the peak while training). Without --model (see bench/make_smollm2.py) only the embedded base is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_md import replace_section  # noqa: E402

SETTINGS = (None, "4bit", "4bit-dq")
CHILD = """
import json, sys, time, torch
torch.set_num_threads({threads})
from swarmtune.node.config import parse_config
from swarmtune.node.local.build import build_local_model
config = parse_config({{"run_id": "qlora-bench", "inner": {{"batch_size": {batch}, "seq_len": {seq}}}}})
t0 = time.perf_counter()
local = build_local_model(config, "builtin:arithmetic", model_path={model!r}, quantize={quantize!r})
load_s = time.perf_counter() - t0
def status(field):
    with open("/proc/self/status") as handle:
        return next(int(l.split()[1]) / 1024 for l in handle if l.startswith(field + ":"))
load_peak, anon, mapped = status("VmHWM"), status("RssAnon"), status("RssFile")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets VmHWM: the training peak below is the training's own
local.trainer.train_steps(2)
t0 = time.perf_counter()
result = local.trainer.train_steps({steps})
seconds = time.perf_counter() - t0
print(json.dumps({{"load_s": load_s, "steps_per_s": {steps} / seconds, "loss_last": result.loss_last,
    "eval": local.eval_loss(), "load_peak_mb": load_peak, "anon_mb": anon, "file_mb": mapped,
    "train_peak_mb": status("VmHWM"),
    "trainable": sum(p.numel() for p in local.trainer.get_params().values())}}))
"""


def measure(model: str | None, quantize: str | None, args: argparse.Namespace) -> dict:
    """One setting in a fresh process; its JSON line."""
    code = CHILD.format(
        threads=args.threads,
        batch=args.batch,
        seq=args.seq,
        model=model,
        quantize=quantize,
        steps=args.steps,
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"qlora bench: {model or 'embedded'} {quantize}: {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local HF causal LM dir (skipped when not given)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    models: list[str | None] = [None]
    if args.model:
        if not Path(args.model).is_dir():
            raise SystemExit(f"qlora bench: --model {args.model} is not a directory")
        models.append(args.model)
    else:
        print("no --model given: measuring the embedded base only")
    rows = [
        "| base | quantize | load s | peak MB while loading | after loading: MB anonymous"
        " + MB file-backed | peak MB while training | steps/s | trainable | eval after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for quantize in SETTINGS:
            r = measure(model, quantize, args)
            name = "embedded (3.4 MB)" if model is None else Path(model).name
            rows.append(
                f"| {name} | {quantize or 'fp32'} | {r['load_s']:.1f} | {r['load_peak_mb']:.0f}"
                f" | {r['anon_mb']:.0f} + {r['file_mb']:.0f} | {r['train_peak_mb']:.0f}"
                f" | {r['steps_per_s']:.2f}"
                f" | {r['trainable']:,} | {r['eval']:.3f} |"
            )
            print(rows[-1], flush=True)
    command = "python bench/qlora.py" + (" --model DIR" if args.model else "")
    text = "\n".join(
        [
            "## QLoRA on CPU",
            "",
            f"`{command} --steps {args.steps} --write` ({platform.machine()}, {args.threads}"
            f" torch threads, batch {args.batch}x{args.seq}, LoRA r=8 on every projection;"
            " each row a fresh process; memory is the process's RSS from /proc/self/status):",
            "",
            *rows,
        ]
    )
    if args.write:
        replace_section("qlora", text)
        print("wrote the qlora section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
