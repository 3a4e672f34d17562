"""Regenerate the embedded base model in node/assets/ (`python -m swarmtune.node.local.make_assets`).

Deterministic from SEED: a byte-level BPE tokenizer trained on the bundled corpus, a tiny
Llama initialised from the seed and briefly pre-trained on a mixture of all built-in tasks,
so that fine-tuning starts from something that behaves like a (very small) pretrained model.
The shipped files are the source of truth; after regenerating, update EMBEDDED_FINGERPRINT.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from swarmtune.node.local.basemodel import (
    ASSET_DIR,
    WEIGHTS_FILE,
    load_tokenizer,
    weights_fingerprint,
)
from swarmtune.node.local.data import BUILTIN_TASKS, TokenBatcher, builtin_texts

SEED = 20240611
CORPUS_PER_TASK = 2000
EOS, PAD = "<|endoftext|>", "<|pad|>"
VOCAB_SIZE = 512
MAX_POSITIONS = 256
PRETRAIN_STEPS = 300
PRETRAIN_SEQ_LEN = 128
PRETRAIN_BATCH = 16
PRETRAIN_LR = 3e-3
WARMUP_STEPS = 30


def corpus(seed: int = SEED) -> list[str]:
    """The generic pre-training mixture: every built-in task, shuffled together."""
    texts = [text for task in BUILTIN_TASKS for text in builtin_texts(task, CORPUS_PER_TASK, seed)]
    # Shuffled, not round-robin: a fixed task cycle would teach the base which task follows EOS.
    random.Random(seed).shuffle(texts)
    return texts


# "role: content" lines; an assistant turn ends with EOS, so chat data teaches the model to stop
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}" + "<|endoftext|>" + "{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_tokenizer(texts: list[str], out_dir: Path) -> None:
    """Train a byte-level BPE on texts and save it as a fast tokenizer directory."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    # Written by hand, not by save_pretrained: transformers 5 would name its own backend class,
    # which older transformers (the project supports >= 4.45) cannot load.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", {"eos_token": EOS, "pad_token": PAD})


def model_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The tiny Llama: 4 layers of width 128, grouped-query attention, untied embeddings."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pretrain(model: LlamaForCausalLM, batcher: TokenBatcher, steps: int) -> list[float]:
    """AdamW with linear warmup and cosine decay; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_scale(step, steps))
    model.train()
    losses = []
    for _ in range(steps):
        batch = batcher.next_batch().input_ids
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _lr_scale(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_assets(out_dir: Path, steps: int = PRETRAIN_STEPS) -> str:
    """Write tokenizer, config and pre-trained weights to out_dir; returns the fingerprint."""
    torch.manual_seed(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = corpus()
    write_tokenizer(texts, out_dir)
    tokenizer = load_tokenizer(out_dir)
    model = LlamaForCausalLM(model_config(tokenizer)).float()
    batcher = TokenBatcher(texts, tokenizer, PRETRAIN_SEQ_LEN, PRETRAIN_BATCH, SEED)
    losses = pretrain(model, batcher, steps)
    print(f"pre-train loss: first {losses[0]:.3f}, last 10 mean {sum(losses[-10:]) / 10:.3f}")
    model.config.save_pretrained(out_dir)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only
    return weights_fingerprint(state)


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main() -> None:
    """CLI entry: regenerate the assets and print the fingerprint to paste into basemodel.py."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="output directory")
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help="pre-training steps")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread keeps the float reductions in a fixed order
    started = time.perf_counter()
    fingerprint = make_assets(args.out, args.steps)
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f}s")
    print(f'EMBEDDED_FINGERPRINT = "{fingerprint}"')


if __name__ == "__main__":
    main()
