"""Assemble a volunteer's local model: base + seeded LoRA + its data, ready for rounds."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from node.config import RunConfig
from node.local.basemodel import load_base, resolve_target_modules
from node.local.data import (
    BUILTIN_PREFIX,
    TokenBatcher,
    builtin_eval_texts,
    eval_batches,
    load_texts,
)
from node.local.trainer import InnerTrainer, attach_lora

EVAL_BATCHES = 4


@dataclass
class LocalModel:
    """Everything one peer trains with; `eval_set` is held out from its training windows."""

    trainer: InnerTrainer
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    target_modules: list[str]
    eval_set: list[torch.Tensor]

    def eval_loss(self) -> float:
        """Mean loss of the current adapter on the held-out windows."""
        return self.trainer.eval_loss(self.eval_set)


def split_eval(spec: str, texts: list[str]) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: built-in tasks have their own eval seed; files hold out 1 in 20."""
    if spec.startswith(BUILTIN_PREFIX):
        return texts, builtin_eval_texts(spec[len(BUILTIN_PREFIX) :])
    if len(texts) < 20:
        return texts, texts
    return [t for i, t in enumerate(texts) if i % 20], texts[::20]


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
) -> LocalModel:
    """Load the base on `device`, attach the manifest's LoRA (seeded), and wrap the peer's
    data; `precision` autocasts the forward pass; `stop` abandons the inner loop at its next
    step once set."""
    base, tokenizer, fingerprint = load_base(model_path, quantize=quantize, device=device)
    targets = target_modules or resolve_target_modules(config, base)
    model = attach_lora(base, config.lora, targets, seed=config.seed)
    train_texts, eval_texts = split_eval(data_spec, load_texts(data_spec, seed=data_seed))
    inner = config.inner
    batches = TokenBatcher(train_texts, tokenizer, inner.seq_len, inner.batch_size, data_seed)
    held_out = eval_batches(eval_texts, tokenizer, inner.seq_len, inner.batch_size, EVAL_BATCHES)
    trainer = InnerTrainer(model, inner, batches, stop=stop, precision=precision)
    return LocalModel(trainer, model, tokenizer, fingerprint, targets, held_out)
