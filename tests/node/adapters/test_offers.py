"""What `pull` writes from a bundle (node/adapters/offers.py, adapter_files)."""

from __future__ import annotations

import json

import pytest

from swarmtune.node.adapters.adapter import ADAPTER_FILES, AdapterError
from swarmtune.node.adapters.offers import Offer, adapter_files
from swarmtune.node.config import parse_config
from swarmtune.protocols.records import ManifestRecord

TARGETS = ["q_proj", "v_proj"]
MANIFEST = ManifestRecord(  # the run's LoRA: r 8, alpha 16 over TARGETS
    run_id="offer-test",
    base_fingerprint="ab" * 32,
    target_modules=TARGETS,
    config=parse_config({"lora": {"rank": 8, "alpha": 16}}).model_dump(),
    coordinator="QmCoordinator000",
)
STATE = Offer("global", 3, "ab" * 32, 10, ("p",), state="cd" * 32)  # a volunteer state's adapter
MADE = Offer("merged", 3, "ab" * 32, 10, ("c",))  # one the coordinator made


def _config(**changes: object) -> dict[str, object]:
    """What PEFT's LoraConfig.to_dict writes for the run's LoRA (the keys that matter)."""
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["v_proj", "q_proj"],
        "bias": "none",
        "modules_to_save": None,
        "layers_to_transform": None,
        "use_dora": False,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": "embedded",
    }
    config.update(changes)
    return config


def _bundle(config: object, **extra: bytes) -> dict[str, bytes]:
    files = {name: b"x" for name in ADAPTER_FILES}
    files["adapter_config.json"] = json.dumps(config).encode()
    return {**files, **extra}


def test_only_the_adapter_files_are_written() -> None:
    files = _bundle(_config(), **{"../escape.py": b"print()", "extra.bin": b"\0" * 64})
    assert set(adapter_files(files, STATE, MANIFEST)) == set(ADAPTER_FILES)


@pytest.mark.parametrize(
    "config",
    [
        _config(modules_to_save=["lm_head"]),  # PEFT would load whole modules from the bundle
        _config(use_dora=True),
        _config(peft_type="IA3"),
        _config(r=64),  # not the run's rank
        _config(lora_alpha=1600),  # a 100x larger scaling
        _config(target_modules=["q_proj", "lm_head"]),
        _config(target_modules=".*"),  # a regex PEFT would match against every module
        _config(rank_pattern={"q_proj": 64}),
        [1, 2],
        "not an object",
    ],
)
def test_a_config_that_asks_peft_for_anything_but_the_runs_lora_is_refused(config: object) -> None:
    with pytest.raises(AdapterError):
        adapter_files(_bundle(config), STATE, MANIFEST)


def test_a_bundle_without_its_files_or_with_a_broken_config_is_refused() -> None:
    files = _bundle(_config())
    del files["adapter_model.safetensors"]
    with pytest.raises(AdapterError, match="lacks"):
        adapter_files(files, STATE, MANIFEST)
    with pytest.raises(AdapterError, match="JSON"):
        adapter_files({**_bundle(_config()), "adapter_config.json": b"{"}, STATE, MANIFEST)


def test_a_coordinator_made_adapter_may_have_its_own_ranks_over_the_runs_targets() -> None:
    merged = _config(r=4, lora_alpha=4, rank_pattern={"q_proj": 8}, alpha_pattern={"q_proj": 8})
    assert set(adapter_files(_bundle(merged), MADE, MANIFEST)) == set(ADAPTER_FILES)
    with pytest.raises(AdapterError):  # but not other modules
        adapter_files(_bundle(_config(target_modules=["lm_head"])), MADE, MANIFEST)


def test_pull_takes_the_newest_offer_some_provider_still_serves(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    # volunteers that just left keep live records for a while: the newest round's providers
    # may all be gone while the coordinator still serves the round before
    from swarmtune.node.roles import consumer
    from swarmtune.protocols.swarm import SwarmError

    offers = [
        Offer("global", 6, "a" * 64, 10, ("v1", "v2")),
        Offer("global", 5, "b" * 64, 10, ("coord",)),
        Offer("global", 4, "c" * 64, 10, ("coord",)),
    ]
    tried: list[int] = []

    def fetch(_node, offer, _may_vote, _manifest):  # noqa: ANN001, ANN202
        tried.append(offer.round)
        if offer.round == 6:
            raise SwarmError("no provider served adapter 'global' intact: v1: gone; v2: gone")
        return {"README.md": b"round 5"}, {"seconds": 0.1}, "the coordinator's own offer"

    monkeypatch.setattr(consumer, "fetch_verified", fetch)
    taken, _, verified = consumer.download_newest(None, offers, tmp_path, None, None)
    assert taken.round == 5 and tried == [6, 5] and verified == "the coordinator's own offer"
    assert (tmp_path / "README.md").read_bytes() == b"round 5"
    err = capsys.readouterr().err
    assert "round 6: no provider served adapter 'global' intact" in err
    assert "took round 5 instead" in err

    def nobody(*_):  # noqa: ANN002, ANN202
        raise SwarmError(f"round {_[1].round}: gone")

    monkeypatch.setattr(consumer, "fetch_verified", nobody)
    with pytest.raises(SwarmError, match="round 6: gone"):  # the newest's reasons
        consumer.download_newest(None, offers, tmp_path, None, None)
