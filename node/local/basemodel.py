"""Base model loading: the embedded tiny Llama shipped in node/assets/, or any local HF causal LM.

Peers prove they share a base model by a weights fingerprint (sha256 of the fp32 weights),
which the run manifest carries. `--quantize 4bit` loads the base with bitsandbytes NF4 for
QLoRA (Dettmers et al. 2023, arXiv 2305.14314).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import pickle
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

if TYPE_CHECKING:
    from swarmtune.node.config import RunConfig

log = logging.getLogger("swarmtune.base")
ASSET_DIR: Path = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED = "embedded"
WEIGHTS_FILE = "model.safetensors"
ASSET_FILES = (
    "config.json",
    WEIGHTS_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
EMBEDDED_FINGERPRINT: str = "5f1b545f1f983a9e39ced58c55919a69f08a17bc71b0e3567c09976cdfe89d2e"
# NF4 (QLoRA), optionally with double quantization of the block scales; CPU or CUDA
QUANTIZE_CHOICES = ("4bit", "4bit-dq")
DEVICES = ("cpu", "cuda", "mps")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name on the Hugging Face hub
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # config, tokenizer, weights
# what transformers' from_pretrained reads: single-file or sharded (with an index) checkpoints
WEIGHT_FILES = (
    WEIGHTS_FILE,
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# transformers renamed `torch_dtype` to `dtype` in v5; the project supports both majors.
_DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


class BaseModelError(ValueError):
    """The base model cannot be used; the message is one line meant for the user."""


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex of the weights, defined exactly as follows.

    For each key in sorted(keys) (Python string order): floating tensors are cast to float32
    (other dtypes are kept), moved to CPU and made contiguous; then the hash is fed the UTF-8
    bytes of json.dumps([key, dtype, shape]) + "\\n" (dtype like "float32", shape a list of
    ints), followed by the tensor's raw little-endian bytes in row-major order.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        tensor = tensor.cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update((json.dumps([name, dtype, list(tensor.shape)]) + "\n").encode("utf-8"))
        digest.update(_little_endian_bytes(tensor))
    return digest.hexdigest()


def _little_endian_bytes(tensor: torch.Tensor) -> bytes:
    array = tensor.numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def resolve_device(name: str) -> torch.device:
    """--device: auto (CUDA, else Apple's MPS, else the CPU), cpu, cuda or mps; BaseModelError
    when the asked-for accelerator is not there."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name not in DEVICES:
        raise BaseModelError(f"unknown device {name!r}; choose from auto, {', '.join(DEVICES)}")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise BaseModelError(f"--device {name}: no {name.upper()} device on this machine")
    return torch.device(name)


def load_base(
    path: str | None = None, quantize: str | None = None, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(eval fp32 model on `device`, tokenizer with pad token, fingerprint) of the embedded or
    a local base.

    The fingerprint is taken from the fp32 weights on the CPU, before any quantization or
    move, so 4-bit, GPU and CPU peers of the same checkpoint agree.
    """
    target = resolve_device(device)
    if quantize is not None and target.type == "mps":
        raise BaseModelError("--quantize runs on CUDA or the CPU, not on MPS")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise BaseModelError(f"unknown quantization {quantize!r}; choose from {QUANTIZE_CHOICES}")
    model_dir = ASSET_DIR if path is None or path == EMBEDDED else resolve_model(path)
    embedded = model_dir == ASSET_DIR
    if quantize is not None:
        _require_4bit_support()
    config = _load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = _load_model(model_dir, config)
    fingerprint = weights_fingerprint(model.state_dict())
    if embedded and fingerprint != EMBEDDED_FINGERPRINT:
        raise BaseModelError(
            f"embedded base model in {ASSET_DIR} does not match EMBEDDED_FINGERPRINT; "
            "reinstall swarmtune (or regenerate with python -m swarmtune.node.local.make_assets)"
        )
    if quantize is not None:
        del model  # free the fp32 copy before the quantized load
        gc.collect()
        model = _load_model(model_dir, config, quantize=quantize, device=target)
        _one_cpu_kernel(model)
    elif target.type != "cpu":
        nn.Module.to(model, target)  # in place (transformers types .to for dtypes only)
    return model.eval(), tokenizer, fingerprint


def _one_cpu_kernel(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes (0.49-0.50) repacks a 4-bit weight in place at
    its first no-grad forward outside training, and asserts that its output size is a multiple
    of 32: the embedded base's layers are not, so every held-out eval failed on such CPUs, and
    elsewhere eval would run another kernel than training does. Keep the one path that works
    on every CPU (dequantize, then matmul)."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 - not typed


def check_local_base(path: str | None, quantize: str | None = None) -> None:
    """Cheap checks of a --model dir and --quantize (no weights loaded); BaseModelError if bad."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise BaseModelError(f"unknown quantization {quantize!r}; choose from {QUANTIZE_CHOICES}")
    if quantize is not None:
        _require_4bit_support()
    if path is None or path == EMBEDDED:
        return
    model_dir = resolve_model(path)
    _load_config(model_dir)
    load_tokenizer(model_dir)
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise BaseModelError(
            f"no model weights in {path} (expected one of {', '.join(WEIGHT_FILES)})"
        )


def resolve_model(path: str) -> Path:
    """A --model value as a model directory: a directory as it is; otherwise a Hugging Face id
    (`org/name`), taken from the local Hugging Face cache, or downloaded (config, tokenizer and
    weights only) where the network allows. BaseModelError, one line, when neither works."""
    if Path(path).expanduser().exists() or not HUB_ID.fullmatch(path):
        return _check_model_dir(path)
    from huggingface_hub import snapshot_download  # (a transformers dependency)

    try:
        found = snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (the hub library raises several kinds)
        log.info("%s is not in the local Hugging Face cache: downloading it", path)
        try:
            found = snapshot_download(path, allow_patterns=HUB_FILES)
        except Exception as err:  # noqa: BLE001 - offline, unknown, gated: one line says which
            raise BaseModelError(
                f"--model {path}: no such directory, not in the local Hugging Face cache, and"
                f" not downloadable ({_one_line(err)})"
            ) from None
    return _check_model_dir(found)


def _check_model_dir(path: str) -> Path:
    model_dir = Path(path).expanduser()
    if not model_dir.exists():
        raise BaseModelError(f"base model path does not exist: {path}")
    if not model_dir.is_dir():
        raise BaseModelError(f"base model path is not a directory: {path}")
    if not (model_dir / "config.json").is_file():
        raise BaseModelError(f"no config.json in {path}: not a Hugging Face model directory")
    return model_dir


def _require_4bit_support() -> None:
    """bitsandbytes >= 0.49 runs NF4 on CPU as well as on CUDA."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise BaseModelError(f"--quantize 4bit needs bitsandbytes: {_one_line(err)}") from None
    version = tuple(int(x) for x in bitsandbytes.__version__.split(".")[:2] if x.isdigit())
    if not torch.cuda.is_available() and version < (0, 49):
        raise BaseModelError(
            f"--quantize 4bit on CPU needs bitsandbytes >= 0.49 (found {bitsandbytes.__version__})"
        )


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer in model_dir, loaded offline, with pad set to EOS where it has none."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:
        if not _bad_files(err):
            raise
        raise BaseModelError(f"cannot load tokenizer from {model_dir}: {_one_line(err)}") from None
    if tokenizer.eos_token is None:
        raise BaseModelError(f"tokenizer in {model_dir} has no EOS token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_config(model_dir: Path) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:
        if not _bad_files(err):
            raise
        raise BaseModelError(f"cannot read model config in {model_dir}: {_one_line(err)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BaseModelError(
            f"{model_dir} is not a causal language model (model_type={config.model_type!r})"
        )
    return config


def _load_model(
    model_dir: Path,
    config: PretrainedConfig,
    quantize: str | None = None,
    device: torch.device | None = None,
) -> PreTrainedModel:
    kwargs: dict = {"local_files_only": True, _DTYPE_KWARG: torch.float32}
    if quantize is not None:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=quantize == "4bit-dq",
        )
        on_cuda = device is not None and device.type == "cuda"
        kwargs["device_map"] = {"": torch.cuda.current_device() if on_cuda else "cpu"}
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, **kwargs)
    except Exception as err:
        if not _bad_files(err, BAD_WEIGHTS):
            raise
        raise BaseModelError(f"cannot load weights from {model_dir}: {_one_line(err)}") from None


# What unreadable or inconsistent files raise from json, transformers, torch and safetensors.
# The Rust tokenizers library raises Exception itself; anything else (AttributeError, TypeError,
# ...) is a bug of ours and keeps its traceback instead of reading as "corrupt files".
BAD_FILES: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    SafetensorError,
)
BAD_WEIGHTS = (*BAD_FILES, RuntimeError, pickle.UnpicklingError)  # torch's zip reader, shapes


def _bad_files(err: BaseException, kinds: tuple[type[BaseException], ...] = BAD_FILES) -> bool:
    return isinstance(err, kinds) or type(err) is Exception


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def export_base(out_dir: str | Path) -> Path:
    """Copy the embedded model into out_dir as a plain HF model dir (bit-identical weights)."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BaseModelError(f"refusing to export into non-empty path: {out}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        shutil.copyfile(ASSET_DIR / name, out / name)
    return out


def detect_target_modules(model: nn.Module) -> list[str]:
    """Sorted name suffixes of the Linear (or GPT-2 Conv1D) layers for LoRA, minus the head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    suffixes = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and module is not head and isinstance(module, nn.Linear | Conv1D)
    }
    suffixes.discard("lm_head")
    return sorted(suffixes)


def resolve_target_modules(config: RunConfig, base: torch.nn.Module) -> list[str]:
    """The configured LoRA targets, or the detected linear projections for 'auto'."""
    if config.lora.target_modules == "auto":
        return detect_target_modules(base)
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = sorted(set(config.lora.target_modules) - names)
    if missing:
        raise BaseModelError(f"LoRA target modules {missing} do not exist in this base model")
    return sorted(config.lora.target_modules)
