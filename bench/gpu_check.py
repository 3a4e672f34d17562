"""The CUDA paths, checked on a machine with a GPU: one line per check, exit 1 if any failed.

    bench/gpu_check.sh [--model DIR] [--data SPEC] [--steps N]

No machine of the project's own has a GPU; run this through the device tool when a session is
lent one, and put its output in bench/RESULTS.md ("GPU check"). Checks:
1. CUDA is there (device name, bf16 support);
2. fp32, bf16 autocast and 4-bit (NF4) volunteers train on CUDA: loss falls, steps/s, peak
   memory; the first step's loss agrees with the CPU's within the precision's rounding;
3. a bf16 CUDA volunteer, a 4-bit CUDA volunteer and an fp32 CPU volunteer run rounds on the
   in-memory transport and end on bit-identical group states;
4. `swarmtune eval`'s metrics (completion loss, exact match) on CUDA match the CPU's.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from swarmtune.node.config import parse_config  # noqa: E402
from swarmtune.node.engine.peer import Peer  # noqa: E402
from swarmtune.node.engine.transport import InMemoryHub, InMemoryTransport  # noqa: E402
from swarmtune.node.local.build import build_local_model  # noqa: E402

RESULTS: list[bool] = []
DEVICE = "cuda"  # --device cpu: a dry run of every check's code on a machine without a GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def config(steps: int) -> Any:
    return parse_config(
        {
            "inner": {"steps": steps, "batch_size": 8, "seq_len": 256, "lr": 0.001},
            "averaging": {"codec": "fp32"},
        }
    )


def train_check(args: argparse.Namespace, precision: str, quantize: str | None) -> None:
    name = f"train {DEVICE} {precision}{' 4-bit' if quantize else ''}"
    cfg = config(args.steps)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    local = build_local_model(
        cfg, args.data, model_path=args.model, device=DEVICE, precision=precision,
        quantize=quantize,
    )  # fmt: skip
    cpu = build_local_model(cfg, args.data, model_path=args.model, device="cpu")
    first_gpu = local.trainer.train_steps(1).loss_first
    first_cpu = cpu.trainer.train_steps(1).loss_first
    sync()
    start = time.perf_counter()
    result = local.trainer.train_steps(args.steps)
    sync()
    rate = args.steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    # bf16 keeps 8 bits of mantissa, NF4 is a 4-bit code: their first losses differ from fp32
    # by the rounding of the forward pass, a few hundredths; fp32 on CUDA by TF32-free rounding
    tolerance = {"fp32": 1e-3, "bf16": 0.05}[precision] + (0.1 if quantize else 0.0)
    agree = abs(first_gpu - first_cpu) <= tolerance * max(1.0, abs(first_cpu))
    falls = result.loss_last < first_gpu
    detail = (
        f"first-step loss {first_gpu:.4f} (cpu fp32 {first_cpu:.4f}), after {args.steps} steps "
        f"{result.loss_last:.4f}; {rate:.2f} steps/s; peak {peak:.2f} GiB"
    )
    check(name, agree and falls, detail)


def rounds_check(args: argparse.Namespace) -> None:
    cfg = config(4)
    hub = InMemoryHub(3)
    setups = [("bf16", None, DEVICE), ("fp32", "4bit", DEVICE), ("fp32", None, "cpu")]
    peers = []
    for i, (precision, quantize, device) in enumerate(setups):
        local = build_local_model(
            cfg, args.data, model_path=args.model, device=device, precision=precision,
            quantize=quantize, data_seed=i,
        )  # fmt: skip
        peers.append(Peer(local.trainer, InMemoryTransport(hub, f"p{i}"), cfg))
    results: list[Any] = [None] * len(peers)

    def work(i: int) -> None:
        results[i] = peers[i].run(3, settle_s=2.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    digests = {r.digest() if r is not None else None for r in results}
    ok = None not in digests and len(digests) == 1
    check(
        f"bf16 {DEVICE} + 4-bit {DEVICE} + fp32 cpu rounds",
        ok,
        f"final digests {sorted(map(str, digests))}",
    )


def eval_check(args: argparse.Namespace) -> None:
    cfg = config(4)
    gpu = build_local_model(cfg, args.data, model_path=args.model, device=DEVICE)
    cpu = build_local_model(cfg, args.data, model_path=args.model, device="cpu")
    on_gpu, on_cpu = gpu.evaluate(), cpu.evaluate()
    loss_gap = abs(on_gpu["eval_loss"] - on_cpu["eval_loss"])  # type: ignore[operator]
    ok = loss_gap <= 1e-3 * max(1.0, on_cpu["eval_loss"] or 0)
    check(f"eval on {DEVICE}", ok, f"{DEVICE} {on_gpu}, cpu {on_cpu}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model dir (default: the embedded base)")
    parser.add_argument("--data", default="builtin:dates", help="data spec (default dates)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per check")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: dry run")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":
        check("cuda", True, "skipped: --device cpu is a dry run of the checks' code")
    elif not torch.cuda.is_available():
        check("cuda", False, "torch.cuda.is_available() is False")
        return 1
    else:
        props = torch.cuda.get_device_properties(0)
        check("cuda", True, f"{props.name}, {props.total_memory / 2**30:.0f} GiB, bf16 "
              f"{torch.cuda.is_bf16_supported()}, torch {torch.__version__}")  # fmt: skip
    for name, run in [
        ("train fp32", lambda: train_check(args, "fp32", None)),
        ("train bf16", lambda: train_check(args, "bf16", None)),
        ("train 4-bit", lambda: train_check(args, "bf16", "4bit")),
        ("rounds", lambda: rounds_check(args)),
        ("eval", lambda: eval_check(args)),
    ]:
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - a crash is this check's FAIL line
            traceback.print_exc()
            check(name, False, f"{type(exc).__name__}: {exc}")
    print(f"{sum(RESULTS)} of {len(RESULTS)} checks passed")
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
