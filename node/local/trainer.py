"""Inner loop: H local AdamW steps on the LoRA parameters of a frozen base (DiLoCo inner phase)."""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from swarmtune.aggregation.params import Params, clone_params
from swarmtune.node.config import InnerSettings, LoraSettings
from swarmtune.node.local.batch import Batch
from swarmtune.node.local.errors import RoundAbandoned, TrainingDiverged

log = logging.getLogger("swarmtune.trainer")


class Batches(Protocol):
    """Source of training batches (windows, packed or padded rows)."""

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Any) -> None: ...


@dataclass(frozen=True)
class InnerResult:
    """What the inner steps produced: steps taken (H, or fewer at a deadline), mean/first/last
    loss, tokens in the loss, time."""

    steps: int
    loss_first: float
    loss_last: float
    loss_mean: float
    tokens: int
    seconds: float


def lora_config(lora: LoraSettings, target_modules: list[str]) -> LoraConfig:
    """PEFT LoraConfig for a resolved module list."""
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(
    base: PreTrainedModel, lora: LoraSettings, target_modules: list[str], seed: int
) -> PeftModel:
    """Wrap base with LoRA; the seed makes the initial adapter identical on every peer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, lora_config(lora, target_modules))
    if lora.freeze_a:  # FFA-LoRA: only B is trained, averaged and sent
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model  # type: ignore[return-value]


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's tokens in the loss."""
    return model(**batch.inputs()).loss


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[Batch]) -> float:
    """Mean loss per token in the loss over fixed batches, on the model's device, in fp32."""
    device = next(model.parameters()).device
    total = sum(float(lm_loss(model, b.to(device))) * b.tokens for b in batches)
    return total / max(sum(b.tokens for b in batches), 1)


AUTOCAST: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def check_finite(value: float, what: str) -> float:
    """`value`, or TrainingDiverged naming `what` when it is NaN or infinite."""
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"{what} is {value}: stopping before it reaches the adapter (nothing of this round is"
            " sent; the last checkpoint is kept). Lower inner.lr or inner.max_grad_norm, use"
            " --precision bf16 rather than fp16, or check the data"
        )
    return value


def native_half_cpu(precision: str) -> bool:
    """Whether this x86 CPU computes `precision` (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16)
    natively. torch says so only through private helpers and only for x86, so another
    architecture (ARM has native bf16 on recent cores) or an unknown answer counts as native:
    no warning."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return True
    names = {"bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
             "fp16": ("_is_amx_fp16_supported",)}.get(precision, ())  # fmt: skip
    probes = [p for p in (getattr(torch.cpu, n, None) for n in names) if callable(p)]
    return not probes or any(bool(p()) for p in probes)


class InnerTrainer:
    """Owns the LoRA model and its AdamW state; theta in and out as named fp32 tensors."""

    def __init__(
        self,
        model: PeftModel,
        inner: InnerSettings,
        batches: Batches,
        stop: threading.Event | None = None,
        precision: str = "fp32",
    ) -> None:
        if precision not in AUTOCAST:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST)}, got {precision!r}")
        self.precision = precision  # autocast of the forward pass; weights and moments stay fp32
        self.model = model
        self.inner = inner
        self.batches = batches
        self._trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.stop = stop  # set: the inner loop abandons the round at its next step
        if not self._trainable:
            raise ValueError("the model has no trainable LoRA parameters")
        # batches follow the model (a 4-bit base sits on CUDA where there is one); parameters
        # leave it as CPU fp32 copies (get_params), so states and checksums never see a device
        self.device = next(iter(self._trainable.values())).device
        # plain SGD: the GHBM paper's clients, a study control
        kind = torch.optim.SGD if inner.optimizer == "sgd" else torch.optim.AdamW
        self.optimizer: torch.optim.Optimizer = kind(
            self._trainable.values(), lr=inner.lr, weight_decay=inner.weight_decay
        )
        if precision != "fp32" and self.device.type == "cpu" and not native_half_cpu(precision):
            log.warning(
                "%s autocast on this CPU (no native support: AVX512-BF16 or AMX) is emulated and"
                " trains several"
                " times slower than fp32 (about 8x for bf16 on an AVX2 machine): --precision"
                " fp32 is faster here",
                precision,
            )
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        if inner.gradient_checkpointing:
            # PEFT freezes the embeddings, so checkpointed blocks would see inputs that need no
            # gradient and drop the LoRA gradients inside them: make the inputs require it
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    def switch_data(self, batches: Batches, optimizer_state: dict[str, Any] | None) -> None:
        """Train on `batches` from now on, with these AdamW moments (None: fresh moments)."""
        self.batches = batches
        if optimizer_state is None:
            self.optimizer.state.clear()
        else:
            self.optimizer.load_state_dict(optimizer_state)

    def reset_optimizer(self) -> None:
        """Forget the AdamW moments (a probe from another starting point must not reuse them)."""
        self.optimizer.state.clear()

    def get_params(self) -> Params:
        """Current trainable parameters (fp32 CPU copies)."""
        return {k: v.cpu() for k, v in clone_params(self._trainable).items()}

    @torch.no_grad()
    def set_params(self, params: Mapping[str, torch.Tensor]) -> None:
        """Load theta into the model; names and shapes must match exactly."""
        if set(params) != set(self._trainable):
            raise KeyError(
                f"parameter names differ: {sorted(set(params) ^ set(self._trainable))[:3]}"
            )
        for name, p in self._trainable.items():
            if params[name].shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(params[name].shape)} != {tuple(p.shape)}")
            p.copy_(params[name])

    @torch.no_grad()
    def shift_params(self, shift: Mapping[str, torch.Tensor]) -> None:
        """theta <- theta - shift, in place (GHBM's per-step momentum correction)."""
        for name, p in self._trainable.items():
            p.sub_(shift[name].to(p.device, p.dtype))

    def train_steps(
        self, steps: int, after_step: Any = None, deadline: float | None = None
    ) -> InnerResult:
        """Run `steps` AdamW steps, or fewer once time.monotonic() passed `deadline` (at least
        one); after_step(j) may adjust parameters (e.g. GHBM correction)."""
        self.model.train()
        losses: list[float] = []
        tokens = 0
        start = time.perf_counter()
        for j in range(steps):
            if j > 0 and deadline is not None and time.monotonic() >= deadline:
                break
            if self.stop is not None and self.stop.is_set():
                raise RoundAbandoned(f"stopped after {j} of {steps} inner steps")
            self.optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=self.device)  # read once per step, as before
            for _ in range(self.inner.grad_accum):  # gradients add up; each batch weighs 1/k
                batch = self.batches.next_batch()
                with self.autocast():
                    part = lm_loss(self.model, batch.to(self.device)) / self.inner.grad_accum
                self.scaler.scale(part).backward()
                loss += part.detach().float()
                tokens += batch.tokens
            value = check_finite(float(loss), f"the loss at inner step {j + 1} of {steps}")
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(self._trainable.values(), self.inner.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if after_step is not None:
                after_step(j)
            losses.append(value)
        self.model.eval()
        return InnerResult(
            len(losses),
            losses[0],
            losses[-1],
            sum(losses) / len(losses),
            tokens,
            time.perf_counter() - start,
        )

    def autocast(self) -> torch.autocast:
        """The forward pass in the volunteer's precision (fp32: autocast off). The LoRA weights,
        their gradients and the AdamW moments stay fp32, so a pseudo-gradient, and everything
        averaged or hashed, is fp32 whatever precision a volunteer trains in."""
        dtype = AUTOCAST[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def eval_loss(self, batches: list[Batch]) -> float:
        """Mean loss per token over fixed held-out batches, in fp32 (comparable across
        volunteers)."""
        self.model.eval()
        return check_finite(mean_loss(self.model, batches), "the held-out loss")

    def state_dict(self) -> dict[str, Any]:
        """Local-only state: AdamW moments and the data stream position."""
        return {"optimizer": self.optimizer.state_dict(), "batches": self.batches.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore local-only state."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
