"""`swarmtune eval`: task metrics of an adapter, beside the base model without one.

The adapter is a PEFT directory or, with --initial-peers, the run's current global adapter
(pulled and verified as `swarmtune pull` does). The data goes through the same reader and
chat template as training. Reported per model: completion-token loss, exact match of greedy
completions (node/local/evaluate.py), and a few rendered samples.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from swarmtune.node.adapters.adapter import AdapterError
from swarmtune.node.adapters.merge import read_adapter
from swarmtune.node.local.basemodel import load_base
from swarmtune.node.local.batch import Batch
from swarmtune.node.local.data import DataError
from swarmtune.node.local.evaluate import Sample, exact_rate, greedy_samples, scoring_set
from swarmtune.node.local.render import Renderer
from swarmtune.node.local.sources import Example, load_examples
from swarmtune.node.local.trainer import mean_loss

log = logging.getLogger("swarmtune.eval")
BATCH = 8


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate, on which data and model."""

    data: str
    adapter: Path | None = None
    initial_peers: list[str] | None = None
    model: str | None = None
    device: str = "cpu"
    max_length: int = 512
    max_examples: int = 200
    samples: int = 3
    as_json: bool = False


@dataclass(frozen=True)
class Scores:
    """One model's metrics on the evaluated examples."""

    loss: float
    exact: float | None
    samples: list[Sample]


def score(
    model: torch.nn.Module, renderer: Renderer, examples: list[Example], batches: list[Batch]
) -> Scores:
    """Completion loss and greedy exact match of one model on prepared held-out examples."""
    samples = greedy_samples(model, renderer, examples)
    return Scores(mean_loss(model, batches), exact_rate(samples), samples)


def evaluate(options: EvalOptions) -> int:
    """Entry point of `swarmtune eval`; prints a table (or JSON) and returns 0."""
    if (options.adapter is None) == (options.initial_peers is None):
        raise AdapterError("give exactly one of --adapter DIR or --initial-peers MADDR")
    if options.max_length < 2 or options.max_examples < 1 or options.samples < 0:
        raise DataError("--max-length must be >= 2, --max-examples >= 1 and --samples >= 0")
    examples = load_examples(options.data)[: options.max_examples]
    if options.initial_peers is not None:
        with tempfile.TemporaryDirectory(prefix="swarmtune-eval-") as tmp:
            from swarmtune.node.roles.consumer import pull  # noqa: PLC0415 - only this path needs the DHT

            with contextlib.redirect_stdout(sys.stderr):  # stdout: the report (or its JSON)
                pull(options.initial_peers, Path(tmp) / "global", "global", False)
            return _evaluate_dir(options, Path(tmp) / "global", examples, "the run's global")
    assert options.adapter is not None
    return _evaluate_dir(options, options.adapter, examples, str(options.adapter))


def _evaluate_dir(options: EvalOptions, adapter: Path, examples: list[Example], label: str) -> int:
    read = read_adapter(adapter)  # one clear line for a missing or broken adapter
    base, tokenizer, fingerprint = load_base(options.model, device=options.device)
    if read.fingerprint is not None and read.fingerprint != fingerprint:
        raise AdapterError(
            f"{adapter} was trained on base {read.fingerprint[:12]}…, not on this --model "
            f"({fingerprint[:12]}…)"
        )
    limit = getattr(base.config, "max_position_embeddings", None) or options.max_length
    length = min(options.max_length, limit)
    renderer, batches, summary = scoring_set(tokenizer, examples, length, BATCH)
    log.info(summary.line())
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    with model.disable_adapter():
        baseline = score(model, renderer, examples, batches)
    tuned = score(model, renderer, examples, batches)
    results = {"base model": baseline, label: tuned}
    if options.as_json:
        print(json.dumps({name: _as_dict(s, options.samples) for name, s in results.items()}))
    else:
        print(report(results, len(examples), options.samples))
    return 0


def _as_dict(scores: Scores, samples: int) -> dict[str, object]:
    return {
        "loss": scores.loss,
        "exact": scores.exact,
        "samples": [s.__dict__ for s in scores.samples[:samples]],
    }


def report(results: dict[str, Scores], n_examples: int, samples: int) -> str:
    """The metrics table and the first `samples` prompts with every model's completion."""
    width = max(len(name) for name in results) + 2
    lines = [f"{n_examples} examples", f"{'model':<{width}}{'loss/token':>11}{'exact':>8}"]
    for name, s in results.items():
        exact = "-" if s.exact is None else f"{s.exact:.1%}"
        lines.append(f"{name:<{width}}{s.loss:>11.3f}{exact:>8}")
    first = next(iter(results.values())).samples
    for k in range(min(samples, len(first))):
        lines += ["", f"--- sample {k + 1}", f"prompt:    {first[k].prompt!r}"]
        lines.append(f"reference: {first[k].reference!r}")
        for name, s in results.items():
            mark = "exact" if s.samples[k].exact else "miss"
            lines.append(f"{name}: {s.samples[k].completion!r} ({mark})")
    return "\n".join(lines)
