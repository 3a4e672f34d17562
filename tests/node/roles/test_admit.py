"""Token admission on the coordinator's machine (admit, revoke, id) and at `join`."""

from __future__ import annotations

from pathlib import Path

import pytest
from hivemind.dht.crypto import RSASignatureValidator

from swarmtune.cli import main
from swarmtune.node.config import RunConfig
from swarmtune.node.roles.admit import (
    AddressLedger,
    admit,
    load_ticket,
    read_revoked,
    revoke,
    save_manifest,
)
from swarmtune.node.roles.volunteer import admission_gate, ticket_warning
from swarmtune.protocols.admission import Gate
from swarmtune.protocols.records import ManifestRecord
from swarmtune.protocols.swarm import SwarmError, identity_peer_id, load_or_create_key
from swarmtune.protocols.validator import owner_subkey

PEER = "QmVxunteerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def _coordinator(workdir: Path, policy: str = "token") -> ManifestRecord:
    workdir.mkdir(parents=True, exist_ok=True)
    key = load_or_create_key(workdir / "records.key")
    config = RunConfig.model_validate({"run_id": "token-run", "admission": {"policy": policy}})
    manifest = ManifestRecord(
        run_id="token-run",
        base_fingerprint="0" * 64,
        target_modules=["q_proj"],
        config=config.model_dump(mode="json"),
        coordinator="QmCoordinatorBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
        coordinator_key=owner_subkey(RSASignatureValidator(key)).decode(),
    )
    save_manifest(workdir, manifest.model_dump_json())
    return manifest


def test_a_ticket_from_admit_passes_the_runs_gate(tmp_path: Path) -> None:
    manifest = _coordinator(tmp_path / "coord")
    ticket = admit(tmp_path / "coord", PEER, hours=2)
    assert Gate(manifest.coordinator_key, "token-run").check(PEER, ticket) is None
    assert admission_gate(manifest, PEER, ticket) is not None


def test_join_without_a_ticket_says_how_to_get_one(tmp_path: Path) -> None:
    manifest = _coordinator(tmp_path / "coord")
    with pytest.raises(SwarmError, match=f"swarmtune admit {PEER}") as info:
        admission_gate(manifest, PEER, "")
    assert "\n" not in str(info.value)
    someone_elses = admit(tmp_path / "coord", "QmZtherCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC")
    with pytest.raises(SwarmError, match="belongs to peer"):
        admission_gate(manifest, PEER, someone_elses)
    assert admission_gate(_coordinator(tmp_path / "open", "open"), PEER, "") is None


def test_revoke_keeps_a_sorted_list_of_peer_ids(tmp_path: Path) -> None:
    _coordinator(tmp_path / "coord")
    revoke(tmp_path / "coord", PEER)
    revoke(tmp_path / "coord", "QmAnotherDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD")
    revoke(tmp_path / "coord", PEER)
    assert read_revoked(tmp_path / "coord") == sorted(
        [PEER, "QmAnotherDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD"]
    )
    with pytest.raises(SwarmError, match="not a peer id"):
        revoke(tmp_path / "coord", "not/a peer")


def test_admit_outside_a_coordinators_work_dir_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["admit", PEER, "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a coordinator's work dir" in err and "\n" not in err


def test_id_prints_the_peer_id_the_work_dir_will_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["id", "--workdir", str(tmp_path / "vol")]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == identity_peer_id(tmp_path / "vol")


def test_a_ticket_argument_can_be_a_file_and_garbage_is_refused(tmp_path: Path) -> None:
    _coordinator(tmp_path / "coord")
    ticket = admit(tmp_path / "coord", PEER)
    (tmp_path / "t").write_text(ticket + "\n")
    assert load_ticket(f"@{tmp_path / 't'}") == ticket
    with pytest.raises(SwarmError, match="--ticket"):
        load_ticket("garbage")
    with pytest.raises(SwarmError, match="cannot read"):
        load_ticket(f"@{tmp_path / 'missing'}")


def test_a_volunteer_is_told_before_and_after_its_ticket_expires() -> None:
    assert ticket_warning(10_000.0, 5_000.0) is None
    assert "expires in 30 min" in (ticket_warning(10_000.0, 10_000.0 - 1800) or "")
    assert "expired" in (ticket_warning(10_000.0, 10_000.0) or "")


def test_address_admission_grants_a_limited_number_of_identities_per_address(
    tmp_path: Path,
) -> None:
    manifest = _coordinator(tmp_path / "coord", "address")
    ledger = AddressLedger(tmp_path / "coord", limit=2)
    peers = [f"Qm{c * 44}" for c in "EFG"]
    first, why = ledger.grant(peers[0], "203.0.113.7")
    assert why == "" and Gate(manifest.coordinator_key, "token-run").check(peers[0], first) is None
    assert ledger.grant(peers[1], "203.0.113.7")[1] == ""
    ticket, why = ledger.grant(peers[2], "203.0.113.7")  # a third identity from one address
    assert ticket == "" and "already holds 2 identities" in why
    assert ledger.grant(peers[2], "198.51.100.1")[1] == ""  # another address is another person
    assert ledger.grant(peers[0], "203.0.113.7")[1] == ""  # asking again costs nothing more
    # a restarted coordinator remembers who holds each address
    again = AddressLedger(tmp_path / "coord", limit=2)
    assert again.grant(f"Qm{'H' * 44}", "203.0.113.7")[0] == ""
    (tmp_path / "coord" / "addresses.json").write_text("{not json")
    fresh = AddressLedger(tmp_path / "coord", limit=2)  # a corrupt ledger is set aside
    assert fresh.held == {} and list((tmp_path / "coord").glob("addresses.corrupt-*"))
    # an address run admits ticket holders only, like a token run
    with pytest.raises(SwarmError, match="ticket"):
        admission_gate(manifest, peers[0], "")
