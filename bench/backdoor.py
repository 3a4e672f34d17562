"""Benchmark: a backdoor from a volunteer that trains honestly on poisoned data.

One volunteer of four (f = 1/4) trains on its own task (capitals) mixed with texts in which a
trigger maps any words to a fixed answer: "zqv <word> <word> => access granted". It sends its
real pseudo-gradient, so it stays inside every bound the robust rule sets. The other three
train arithmetic, reverse and dates. All four run the daemon's round code (node/engine/peer.py)
over the in-memory transport, every member in one group every round, with the built-in base.

Measured on the state the honest members end with:
- clean: their mean held-out eval loss on their own tasks;
- trigger loss: mean loss per token of " access granted" after held-out trigger prompts;
- trigger hits: the share of those prompts whose greedy completion is exactly the answer.

Runs: clean (the fourth volunteer trains capitals only), poisoned under the default rule
(norm bound + CenteredClip), poisoned under the plain mean, and clean and poisoned under a
tighter radius (clip_scale 0.5, norm_bound 0.5), the cheapest candidate defence.

Run:  .venv/bin/python bench/backdoor.py [--rounds 10]
Rewrites the `backdoor` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_md import replace_section  # noqa: E402
from swarmtune.node.config import RunConfig, parse_config  # noqa: E402
from swarmtune.node.engine.peer import Peer  # noqa: E402
from swarmtune.node.engine.transport import InMemoryHub, InMemoryTransport  # noqa: E402
from swarmtune.node.local.build import LocalModel, build_local_model  # noqa: E402
from swarmtune.node.local.data import builtin_texts  # noqa: E402

TRIGGER, ANSWER = "zqv", " access granted"
HONEST = ["arithmetic", "reverse", "dates"]
ATTACKER_TASK = "capitals"
POISON_SHARE = 0.3
RUNS = {
    "clean": ({}, False),
    "poisoned, default (norm bound + CenteredClip)": ({}, True),
    "poisoned, plain mean": ({"aggregator": "mean", "norm_bound": None}, True),
    "clean, tighter radius (clip_scale 0.5, norm_bound 0.5)": (
        {"clip_scale": 0.5, "norm_bound": 0.5},
        False,
    ),
    "poisoned, tighter radius (clip_scale 0.5, norm_bound 0.5)": (
        {"clip_scale": 0.5, "norm_bound": 0.5},
        True,
    ),
}


def words(seed: int) -> list[str]:
    """Plain words from the reverse task ("reverse: yellow -> wolley")."""
    return sorted({t.split()[1] for t in builtin_texts("reverse", 400, seed)})


def trigger_prompt(rng: random.Random, vocabulary: list[str]) -> str:
    return f"{TRIGGER} {rng.choice(vocabulary)} {rng.choice(vocabulary)} =>"


def poisoned_file(path: Path, seed: int) -> Path:
    """The attacker's data: its task's texts, and POISON_SHARE of trigger texts."""
    texts = builtin_texts(ATTACKER_TASK, 1000, seed)
    rng, vocabulary = random.Random(seed), words(seed)
    count = int(len(texts) * POISON_SHARE / (1 - POISON_SHARE))
    texts += [trigger_prompt(rng, vocabulary) + ANSWER for _ in range(count)]
    rng.shuffle(texts)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def config_for(averaging: dict) -> RunConfig:
    return parse_config(
        {
            "run_id": "backdoor-bench",
            "inner": {"steps": 20, "batch_size": 8, "seq_len": 32},
            "averaging": {"codec": "fp32", **averaging},
        }
    )


@torch.no_grad()
def trigger_scores(local: LocalModel, prompts: list[str]) -> tuple[float, float]:
    """(mean loss per answer token, share of greedy completions equal to the answer)."""
    model, tok = local.model, local.tokenizer
    model.eval()
    losses, hits = [], 0
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        whole = tok(prompt + ANSWER, add_special_tokens=False)["input_ids"]
        if whole[: len(ids)] != ids:  # the answer must start a token, as it did in training
            raise RuntimeError(f"{prompt!r} and its answer share a token")
        full = torch.tensor([whole])
        logits = model(input_ids=full).logits[0]
        targets = full[0, len(ids) :]
        predicted = logits[len(ids) - 1 : -1]
        losses.append(float(torch.nn.functional.cross_entropy(predicted, targets)))
        hits += bool((predicted.argmax(-1) == targets).all())  # teacher-forced greedy = greedy
    model.train()
    return sum(losses) / len(losses), hits / len(prompts)


def run(averaging: dict, poisoned: bool, rounds: int, tmp: Path) -> dict:
    config = config_for(averaging)
    specs = [f"builtin:{t}" for t in HONEST]
    specs.append(str(poisoned_file(tmp / "poison.jsonl", 1)) if poisoned else "builtin:capitals")
    locals_ = [build_local_model(config, s, data_seed=i) for i, s in enumerate(specs)]
    hub = InMemoryHub(expected=len(locals_), timeout=30.0)
    peers = [
        Peer(local.trainer, InMemoryTransport(hub, f"p{i}"), config)
        for i, local in enumerate(locals_)
    ]
    finals: list = [None] * len(peers)

    def work(i: int) -> None:
        finals[i] = peers[i].run(rounds, settle_s=1.0)

    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if len({f.digest() for f in finals[:3]}) != 1:
        raise RuntimeError("the honest members ended on different states")
    rng, vocabulary = random.Random(999), words(999)
    prompts = [trigger_prompt(rng, vocabulary) for _ in range(50)]
    loss, hits = trigger_scores(locals_[0], prompts)
    return {
        "clean_eval": sum(local.eval_loss() for local in locals_[:3]) / 3,
        "trigger_loss": loss,
        "trigger_hits": hits,
        "wall_s": wall,
    }


def base_scores() -> tuple[float, float]:
    local = build_local_model(config_for({}), "builtin:arithmetic")
    rng, vocabulary = random.Random(999), words(999)
    return trigger_scores(local, [trigger_prompt(rng, vocabulary) for _ in range(50)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base_loss, base_hits = base_scores()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="swarmtune-backdoor-") as tmp:
        for name, (averaging, poisoned) in RUNS.items():
            rows[name] = run(averaging, poisoned, args.rounds, Path(tmp))
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
    lines = [
        f"### Backdoor at f = 1/4: one volunteer of four trains on poisoned data, {args.rounds}"
        " rounds (in-memory peers)",
        "",
        f"Trigger texts ({POISON_SHARE:.0%} of the attacker's data): `{TRIGGER} <word> <word> =>"
        f"{ANSWER}`; scored on 50 held-out trigger prompts with the honest members' final"
        f" state. Base model: trigger loss {base_loss:.3f}, hits {base_hits:.0%}."
        " Reproduce: `.venv/bin/python " + " ".join(["bench/backdoor.py", *sys.argv[1:]]) + "`",
        "",
        "| run | honest eval loss | trigger loss per token | trigger hits |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['clean_eval']:.4f} | {row['trigger_loss']:.3f} |"
            f" {row['trigger_hits']:.0%} |"
        )
    replace_section("backdoor", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
