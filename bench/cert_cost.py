"""Benchmark: what round certificates add to a round (docs/design.md, 8. Trust).

Per round every member signs one body (which hashes the new adapter's tensors), and every sync
reads the group's votes (each signature checked once, then cached) and hashes its own state
once more; a peer that adopts a state checks a chain once. Measured on the embedded model's
adapter and on one of SmolLM2-135M's shape (r=8 on all seven projections of 30 layers, random
values: only the sizes matter here), groups of 4 and 16.

Run:  .venv/bin/python bench/cert_cost.py
Writes the `cert-cost` section of bench/RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from results_md import replace_section  # noqa: E402

from swarmtune.node.config import parse_config  # noqa: E402
from swarmtune.node.engine.certify import Claim, candidates, round_body, verify_chain  # noqa: E402
from swarmtune.node.engine.state import GroupState  # noqa: E402
from swarmtune.node.local.build import build_local_model  # noqa: E402
from swarmtune.protocols.certificates import MAX_CHAIN, Certificate, sign_body  # noqa: E402
from swarmtune.protocols.identity import Identity, owns  # noqa: E402


def smollm_shaped() -> dict[str, torch.Tensor]:
    """LoRA r=8 tensors of SmolLM2-135M's shapes (hidden 576, kv 192, mlp 1536, 30 layers)."""
    outs = {"q": 576, "k": 192, "v": 192, "o": 576, "gate": 1536, "up": 1536, "down": 576}
    ins = {"q": 576, "k": 576, "v": 576, "o": 576, "gate": 576, "up": 576, "down": 1536}
    params = {}
    for layer in range(30):
        for name, out in outs.items():
            stem = f"base_model.model.model.layers.{layer}.{name}_proj"
            params[f"{stem}.lora_A.default.weight"] = torch.randn(8, ins[name])
            params[f"{stem}.lora_B.default.weight"] = torch.randn(out, 8)
    return params


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(params: dict[str, torch.Tensor], group: int, ids: list[Identity]) -> dict[str, float]:
    before, after = GroupState(1, params, {"lr": 1.0}), GroupState(2, params, {"lr": 1.0})
    members = [(i.peer_id, "ab" * 32, 100.0) for i in ids[:group]]

    def conclude() -> Certificate:
        body = round_body("bench-run", before.digest(), after, members)
        return Certificate(body, (sign_body(ids[0], body, ids[0].peer_id),))

    cert = conclude()
    votes = [sign_body(i, cert.body, i.peer_id) for i in ids[:group]]
    claims = {v.peer: Claim(2, after.digest(), cert.body.sha256(), v) for v in votes}

    def vouched() -> None:
        candidates(claims, group, lambda v: owns(v.peer, v.key))

    vouched()  # the first read checks every signature; later reads hit the cache
    links = []
    start = GroupState(0, params, {"lr": 1.0})
    states = [start]
    for r in range(1, MAX_CHAIN + 1):
        nxt = GroupState(r, params, {"lr": 1.0 + r})
        body = round_body("bench-run", states[-1].digest(), nxt, members)
        links.append(Certificate(body, tuple(sign_body(i, body, i.peer_id) for i in ids[:group])))
        states.append(nxt)
    newest = states[-1]
    return {
        "sign": best_of(conclude),
        "read_votes": best_of(vouched),
        "state_digest": best_of(after.digest),
        "chain": best_of(
            lambda: verify_chain(
                links,
                newest,
                "bench-run",
                {start.digest()},
                (),
                group,
                lambda v: owns(v.peer, v.key),
            ),
            repeats=1,  # the first check: no signature cached yet
        ),
    }


def main() -> None:
    torch.set_num_threads(1)
    ids = [Identity.generate() for _ in range(16)]
    tiny = build_local_model(parse_config({}), "builtin:arithmetic").trainer.get_params()
    rows = []
    for label, params in (("embedded model", tiny), ("SmolLM2-135M shapes", smollm_shaped())):
        mb = sum(v.numel() for v in params.values()) * 4 / 1e6
        for group in (4, 16):
            result = measure(params, group, ids)
            rows.append((label, mb, group, result))
            print(label, group, result, flush=True)
    lines = [
        "### What round certificates cost (bench/cert_cost.py)",
        "",
        f"`.venv/bin/python bench/cert_cost.py` on {platform.machine()}, {os.cpu_count()} cores,"
        f" torch {torch.__version__}, one thread; best of 5 (the chain: its first check, nothing cached).",
        "",
        "| adapter | MB | group | sign our vote (ms) | read the group's votes (ms, cached) | one more state digest (ms) | check a 64-link chain (s, once per adoption) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, mb, group, r in rows:
        lines.append(
            f"| {label} | {mb:.1f} | {group} | {1e3 * r['sign']:.1f} | {1e3 * r['read_votes']:.2f}"
            f" | {1e3 * r['state_digest']:.1f} | {r['chain']:.2f} |"
        )
    replace_section("cert-cost", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
