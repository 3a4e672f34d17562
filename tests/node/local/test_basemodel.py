"""Embedded base model: fingerprint, loading, export round trip, errors, LoRA targets."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from swarmtune.node.local import basemodel
from swarmtune.node.local.basemodel import (
    ASSET_DIR,
    EMBEDDED,
    EMBEDDED_FINGERPRINT,
    BaseModelError,
    check_local_base,
    detect_target_modules,
    export_base,
    load_base,
    weights_fingerprint,
)
from swarmtune.node.local.batch import Batch
from swarmtune.node.local.data import (
    BUILTIN_COUNT,
    TokenBatcher,
    builtin_eval_texts,
    builtin_texts,
    eval_batches,
)

LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def embedded():
    return load_base()


def test_shipped_fingerprint_matches_asset_file():
    state = load_file(str(ASSET_DIR / "model.safetensors"))
    assert weights_fingerprint(state) == EMBEDDED_FINGERPRINT


def test_assets_stay_small():
    total = sum(p.stat().st_size for p in ASSET_DIR.iterdir() if p.is_file())
    assert total < 5 * 2**20


def test_fingerprint_follows_its_documented_definition():
    state = {"b": torch.arange(6, dtype=torch.int64).reshape(2, 3), "a": torch.tensor([1.5, -2.0])}
    oracle = hashlib.sha256()
    oracle.update(b'["a", "float32", [2]]\n' + struct.pack("<2f", 1.5, -2.0))
    oracle.update(b'["b", "int64", [2, 3]]\n' + struct.pack("<6q", *range(6)))
    assert weights_fingerprint(state) == oracle.hexdigest()


def test_fingerprint_is_order_free_dtype_canonical_and_value_sensitive():
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    reference = weights_fingerprint({"w": weight, "v": weight[0]})
    assert weights_fingerprint({"v": weight[0].clone(), "w": weight.t().contiguous().t()}) == (
        reference
    )
    as_bf16 = weight.to(torch.bfloat16)
    assert weights_fingerprint({"w": as_bf16}) == weights_fingerprint({"w": as_bf16.float()})
    nudged = weight.clone()
    nudged[2, 1] = torch.nextafter(nudged[2, 1], torch.tensor(1.0))
    assert weights_fingerprint({"w": nudged, "v": weight[0]}) != reference


def test_load_base_embedded(embedded):
    model, tokenizer, fingerprint = embedded
    assert fingerprint == EMBEDDED_FINGERPRINT
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert load_base(EMBEDDED)[2] == EMBEDDED_FINGERPRINT


def test_embedded_base_is_pretrained(embedded):
    model, tokenizer, _ = embedded
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(generated[0, prompt.shape[1] :]).startswith(" Paris")


def test_export_round_trip_with_plain_transformers(embedded, tmp_path):
    model, tokenizer, _ = embedded
    out = export_base(tmp_path / "base")
    plain_model = AutoModelForCausalLM.from_pretrained(out)
    plain_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "reverse: planet -> tenalp"
    assert plain_tokenizer(text).input_ids == tokenizer(text).input_ids
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(plain_model(ids).logits, model(ids).logits)
    assert weights_fingerprint(plain_model.state_dict()) == EMBEDDED_FINGERPRINT
    assert load_base(str(out))[2] == EMBEDDED_FINGERPRINT


def test_export_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(BaseModelError, match="non-empty"):
        export_base(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def _one_line_error(path: str) -> str:
    with pytest.raises(BaseModelError) as caught:
        load_base(path)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_load_base_bad_paths(tmp_path):
    assert "does not exist" in _one_line_error(str(tmp_path / "missing"))
    (tmp_path / "file.bin").write_bytes(b"x")
    assert "not a directory" in _one_line_error(str(tmp_path / "file.bin"))
    assert "no config.json" in _one_line_error(str(tmp_path))


def test_load_base_rejects_non_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert "not a causal language model" in _one_line_error(str(tmp_path))


def test_load_base_rejects_corrupt_weights(tmp_path):
    out = export_base(tmp_path / "base")
    (out / "model.safetensors").write_bytes(b"not safetensors")
    assert "cannot load weights" in _one_line_error(str(out))


def test_bad_quantization_and_an_old_bitsandbytes_on_cpu_are_one_clear_error(monkeypatch):
    import bitsandbytes

    with pytest.raises(BaseModelError, match="unknown quantization"):
        load_base(quantize="3bit")
    monkeypatch.setattr(basemodel.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bitsandbytes, "__version__", "0.48.2")
    with pytest.raises(BaseModelError, match="needs bitsandbytes >= 0.49"):
        load_base(quantize="4bit")


@pytest.mark.parametrize("quantize", ["4bit", "4bit-dq"])
def test_a_4bit_base_on_cpu_keeps_the_fp32_fingerprint_and_trains_lora(quantize, monkeypatch):
    import bitsandbytes as bnb

    from swarmtune.node.config import parse_config
    from swarmtune.node.local.build import build_local_model

    # as on a CPU with AVX512-BF16, where bitsandbytes' in-place repacking at the first eval
    # fails on these layer sizes: every CPU must take the dequantize-then-matmul path
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)

    config = parse_config({"run_id": "qlora-cpu", "inner": {"batch_size": 4, "seq_len": 32}})
    full = build_local_model(config, "builtin:arithmetic")
    local = build_local_model(config, "builtin:arithmetic", quantize=quantize)
    assert local.fingerprint == full.fingerprint == EMBEDDED_FINGERPRINT  # same run, either way
    layers = [m for m in local.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * len(LLAMA_TARGETS)  # every projection of the 4 layers
    assert {m.weight.quant_state.nested for m in layers} == {quantize == "4bit-dq"}
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    # NF4 keeps the function: a broken quantization is far off (a uniform guess is ln 512 = 6.2)
    before, reference = local.eval_loss(), full.eval_loss()
    assert abs(before - reference) < 0.05 * reference
    params = local.trainer.get_params()
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params.values())
    local.trainer.train_steps(20)
    assert local.eval_loss() < before - 0.05
    local.trainer.set_params(params)  # states travel as CPU fp32 tensors, and come back exactly
    assert all(torch.equal(local.trainer.get_params()[k], v) for k, v in params.items())


def test_detect_target_modules_llama_and_gpt2(embedded):
    assert detect_target_modules(embedded[0]) == LLAMA_TARGETS
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    assert detect_target_modules(gpt2) == ["c_attn", "c_fc", "c_proj"]


def test_lora_steps_reduce_loss_on_a_builtin_task():
    torch.manual_seed(0)
    model, tokenizer, _ = load_base()
    targets = detect_target_modules(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    batcher = TokenBatcher(builtin_texts("arithmetic", BUILTIN_COUNT, 0), tokenizer, 64, 8, seed=0)
    held_out = eval_batches(builtin_eval_texts("arithmetic"), tokenizer, 64, 8, 2)
    before = _mean_loss(peft_model, held_out)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    peft_model.train()
    for _ in range(30):
        batch = batcher.next_batch().input_ids
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _mean_loss(peft_model, held_out)
    assert after < before - 0.1, (before, after)  # measured: 2.21 -> 1.98


def _mean_loss(model: torch.nn.Module, batches: list[Batch]) -> float:
    model.eval()
    with torch.no_grad():
        return sum(model(**b.inputs()).loss.item() for b in batches) / len(batches)


def test_asset_files_are_what_export_copies():
    shipped = {p.name for p in Path(ASSET_DIR).iterdir() if p.suffix in {".json", ".safetensors"}}
    assert shipped == set(basemodel.ASSET_FILES)


def test_ffa_lora_trains_and_sends_only_b_while_a_stays_the_shared_seeded_one():
    from swarmtune.node.adapters.adapter import adapter_tensors
    from swarmtune.node.config import ConfigError, parse_config
    from swarmtune.node.local.build import build_local_model

    config = parse_config(
        {
            "run_id": "ffa-test",
            "lora": {"freeze_a": True},
            "inner": {"batch_size": 4, "seq_len": 32},
        }
    )
    one = build_local_model(config, "builtin:arithmetic", data_seed=1)
    two = build_local_model(config, "builtin:capitals", data_seed=2)
    params = one.trainer.get_params()
    assert params and all(".lora_B." in name for name in params)  # half of the LoRA tensors
    a_before = {k: v for k, v in adapter_tensors(one.model).items() if ".lora_A." in k}
    before = one.eval_loss()
    one.trainer.train_steps(20)
    two.trainer.train_steps(5)
    assert one.eval_loss() < before - 0.05  # B alone learns
    for model in (one.model, two.model):  # A is the seeded init on every peer, untouched
        tensors = adapter_tensors(model)
        assert all(torch.equal(tensors[k], a_before[k]) for k in a_before)
    with pytest.raises(ConfigError, match="freeze_a cannot be combined with clustering"):
        parse_config({"lora": {"freeze_a": True}, "clustering": {"enabled": True}})


def test_saving_an_adapter_asks_the_hub_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # PEFT's default ("auto") asks the Hugging Face Hub about the base model's config.json on
    # every save: a network call at run time (and a stall where DNS times out)
    import huggingface_hub

    from swarmtune.node.adapters.adapter import adapter_tensors
    from swarmtune.node.config import parse_config
    from swarmtune.node.local.build import build_local_model

    asked: list[tuple[object, ...]] = []

    def no_network(*args: object, **kwargs: object) -> bool:
        asked.append(args)  # (PEFT catches whatever this raises: record the call instead)
        return False

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "file_exists", no_network)
    monkeypatch.setattr("peft.utils.other.file_exists", no_network, raising=False)
    config = parse_config({"run_id": "offline-test", "inner": {"batch_size": 4, "seq_len": 32}})
    local = build_local_model(config, "builtin:arithmetic", data_seed=1)
    # as in a pulled or merged adapter: the base named by its run name, not by a local dir
    local.model.peft_config["default"].base_model_name_or_path = "embedded"
    tensors = adapter_tensors(local.model)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert asked == []


def test_plain_sgd_inner_steps_are_a_working_control() -> None:
    from swarmtune.node.config import parse_config
    from swarmtune.node.local.build import build_local_model

    config = parse_config(
        {
            "run_id": "sgd-test",
            "inner": {"optimizer": "sgd", "lr": 0.2, "batch_size": 4, "seq_len": 32},
        }
    )
    local = build_local_model(config, "builtin:arithmetic", data_seed=1)
    assert type(local.trainer.optimizer) is torch.optim.SGD
    before = local.eval_loss()
    local.trainer.train_steps(20)
    assert local.eval_loss() < before - 0.05


def _hub_cache(root: Path, repo: str) -> Path:
    """A local Hugging Face cache holding the embedded base under `repo` (the layout the hub
    library writes: models--ORG--NAME/refs/main naming a snapshot folder)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("c0" * 20)
    snapshot.mkdir(parents=True)
    for name in basemodel.ASSET_FILES:
        (snapshot / name).write_bytes((basemodel.ASSET_DIR / name).read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("c0" * 20)
    return snapshot


def test_a_hub_id_resolves_from_the_local_cache_with_the_same_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # nothing here may reach the network
    snapshot = _hub_cache(tmp_path, "acme/tiny-base")
    assert basemodel.resolve_model("acme/tiny-base") == snapshot
    _, _, fingerprint = load_base("acme/tiny-base")
    assert fingerprint == EMBEDDED_FINGERPRINT  # the same weights, wherever they come from
    check_local_base("acme/tiny-base")
    with pytest.raises(BaseModelError, match="acme/absent") as err:
        load_base("acme/absent")
    assert "\n" not in str(err.value) and "not downloadable" in str(err.value)
    with pytest.raises(BaseModelError, match="does not exist"):  # a path is still a path
        load_base(str(tmp_path / "nowhere"))


def test_bf16_autocast_trains_while_weights_and_moments_stay_fp32(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from swarmtune.node.config import parse_config
    from swarmtune.node.local import trainer as trainer_module
    from swarmtune.node.local.build import build_local_model

    config = parse_config({"inner": {"steps": 12, "batch_size": 8, "seq_len": 48, "lr": 3e-3}})
    # a CPU without native bf16 (AVX2 only) emulates it ~8x slower than fp32: the user is told
    monkeypatch.setattr(trainer_module, "native_half_cpu", lambda precision: False)
    with caplog.at_level("WARNING", logger="swarmtune.trainer"):
        local = build_local_model(config, "builtin:arithmetic", precision="bf16")
        warned = caplog.text
        caplog.clear()
        trainer_module.InnerTrainer(local.model, config.inner, local.trainer.batches)
    assert "bf16 autocast on this CPU" in warned and "--precision fp32" in warned
    assert "autocast" not in caplog.text  # fp32 has nothing to say
    before = local.eval_loss()
    seen: list[torch.dtype] = []
    hook = local.model.register_forward_hook(lambda _m, _i, out: seen.append(out.logits.dtype))
    result = local.trainer.train_steps(12)
    hook.remove()
    assert torch.bfloat16 in seen  # the forward pass ran in bf16
    assert result.loss_last < result.loss_first and local.eval_loss() < before
    params = local.trainer.get_params()
    assert all(p.dtype == torch.float32 for p in params.values())
    moments = [t for s in local.trainer.optimizer.state.values() for t in s.values()]
    assert moments and all(t.dtype == torch.float32 for t in moments if t.is_floating_point())
    with pytest.raises(ValueError, match="precision"):
        build_local_model(config, "builtin:arithmetic", precision="fp8")


def test_device_choice_is_checked_and_auto_falls_back_to_the_cpu() -> None:
    assert basemodel.resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and getattr(torch.backends, "mps", None) is not None:
        expected = "mps" if torch.backends.mps.is_available() else "cpu"
    assert basemodel.resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(BaseModelError, match="no CUDA device"):
            basemodel.resolve_device("cuda")
    with pytest.raises(BaseModelError, match="unknown device"):
        basemodel.resolve_device("tpu")


class _Fixed:
    """The same windows every time, `rows` at a time (a Batches for exact comparisons)."""

    def __init__(self, windows: torch.Tensor, rows: int) -> None:
        self.windows, self.rows, self.drawn = windows, rows, 0

    def next_batch(self) -> Batch:
        start = (self.drawn * self.rows) % len(self.windows)
        self.drawn += 1
        return Batch.windows(self.windows[start : start + self.rows])

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]


def _one_sgd_step(inner: dict, rows: int, windows: torch.Tensor) -> tuple[dict, int]:
    from swarmtune.node.config import parse_config
    from swarmtune.node.local.build import build_local_model

    config = parse_config({"inner": {"optimizer": "sgd", "lr": 0.5, "seq_len": 48, **inner}})
    local = build_local_model(config, "builtin:arithmetic")
    local.trainer.batches = _Fixed(windows, rows)
    result = local.trainer.train_steps(1)
    return local.trainer.get_params(), result.tokens


def test_gradient_accumulation_and_checkpointing_change_memory_not_the_step() -> None:
    _, tokenizer, _ = load_base()
    windows = (
        TokenBatcher(builtin_texts("arithmetic", BUILTIN_COUNT, 0), tokenizer, 48, 8, 0)
        .next_batch()
        .input_ids
    )
    reference, tokens = _one_sgd_step({"batch_size": 8}, 8, windows)
    # two batches of 4 full windows: their mean loss is the mean over all 8, so one SGD step
    # moves the weights the same way (fp32 sums in another order: a few eps of the weights)
    accumulated, accumulated_tokens = _one_sgd_step({"batch_size": 4, "grad_accum": 2}, 4, windows)
    checkpointed, _ = _one_sgd_step({"batch_size": 8, "gradient_checkpointing": True}, 8, windows)
    assert accumulated_tokens == tokens == windows.numel()
    eps = torch.finfo(torch.float32).eps
    for name, value in reference.items():
        atol = 64 * eps * float(value.abs().max())
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=atol)
        torch.testing.assert_close(checkpointed[name], value, rtol=0, atol=atol)
    # and the step was a real one: the weights moved by far more than that tolerance
    from swarmtune.node.config import parse_config
    from swarmtune.node.local.build import build_local_model

    start = build_local_model(parse_config({}), "builtin:arithmetic").trainer.get_params()
    moved = max(float((reference[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e3 * eps * max(float(v.abs().max()) for v in reference.values())
