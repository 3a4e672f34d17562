"""Assemble a volunteer's local model: base + seeded LoRA + its data, ready for rounds."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from swarmtune.node.config import RunConfig
from swarmtune.node.local.basemodel import load_base, resolve_target_modules
from swarmtune.node.local.batch import Batch
from swarmtune.node.local.data import BUILTIN_PREFIX, builtin_eval_texts, split_cue
from swarmtune.node.local.evaluate import exact_rate, greedy_samples, scoring_set
from swarmtune.node.local.packing import DataSummary, ExampleBatcher, tokenize_all
from swarmtune.node.local.render import Renderer
from swarmtune.node.local.sources import Example, load_examples
from swarmtune.node.local.trainer import InnerTrainer, attach_lora

EVAL_BATCHES = 4
EXACT_EXAMPLES = 32  # held-out prompts completed greedily at every evaluation


@dataclass
class LocalModel:
    """Everything one peer trains with; `eval_set` and `eval_examples` are held out from its
    training examples."""

    trainer: InnerTrainer
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    target_modules: list[str]
    eval_set: list[Batch]
    eval_examples: list[Example] = field(default_factory=list)
    renderer: Renderer | None = None
    summary: DataSummary | None = None
    first_example: str = ""  # the first training example as the model reads it

    def eval_loss(self) -> float:
        """Mean completion loss per token of the current adapter on the held-out batches."""
        return self.trainer.eval_loss(self.eval_set)

    def evaluate(self) -> dict[str, float | None]:
        """Held-out completion loss and exact match (None where no example has an answer)."""
        exact = None
        if self.renderer is not None and self.eval_examples:
            samples = greedy_samples(self.model, self.renderer, self.eval_examples)
            exact = exact_rate(samples)
        return {"eval_loss": self.eval_loss(), "eval_exact": exact}


def split_eval(spec: str, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held-out): built-in tasks have their own eval seed; other data holds out 1 in
    20 (all of it when there are fewer than 20 examples)."""
    if spec.startswith(BUILTIN_PREFIX):
        task = spec[len(BUILTIN_PREFIX) :]
        held = [
            Example(f"{spec}#eval{i}", text=t, cue=split_cue(task, t))
            for i, t in enumerate(builtin_eval_texts(task))
        ]
        return examples, held
    if len(examples) < 20:
        return examples, examples
    return [e for i, e in enumerate(examples) if i % 20], examples[::20]


def build_local_model(
    config: RunConfig,
    data_spec: str,
    *,
    model_path: str | None = None,
    target_modules: list[str] | None = None,
    data_seed: int = 0,
    quantize: str | None = None,
    stop: threading.Event | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    loss: str = "completion",
    packed: bool = True,
    examples: list[Example] | None = None,
) -> LocalModel:
    """Load the base on `device`, attach the manifest's LoRA (seeded), and batch the peer's
    data; `precision` autocasts the forward pass; `stop` abandons the inner loop at its next
    step once set; `loss` and `packed` say how examples are trained (node/local/render.py,
    node/local/packing.py); `examples`: the data, already read from `data_spec` (a file's
    examples do not depend on the seed; built-in texts do, and are generated here)."""
    base, tokenizer, fingerprint = load_base(model_path, quantize=quantize, device=device)
    targets = target_modules or resolve_target_modules(config, base)
    model = attach_lora(base, config.lora, targets, seed=config.seed)
    if examples is None or data_spec.startswith(BUILTIN_PREFIX):
        examples = load_examples(data_spec, seed=data_seed)
    train, held_out = split_eval(data_spec, examples)
    inner = config.inner
    renderer = Renderer(tokenizer, inner.seq_len, loss)
    tokens, summary = tokenize_all(train, renderer)
    pad = tokenizer.pad_token_id  # load_tokenizer sets one (EOS where the model has none)
    batches = ExampleBatcher(tokens, inner.seq_len, inner.batch_size, data_seed, pad, packed)
    judge, eval_set, _ = scoring_set(
        tokenizer, held_out, inner.seq_len, inner.batch_size, EVAL_BATCHES
    )
    trainer = InnerTrainer(model, inner, batches, stop=stop, precision=precision)
    first = renderer.text(train[0])
    return LocalModel(
        trainer,
        model,
        tokenizer,
        fingerprint,
        targets,
        eval_set,
        held_out[:EXACT_EXAMPLES],
        judge,
        summary,
        first,
    )
