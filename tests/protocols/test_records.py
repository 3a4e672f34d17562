"""DHT record validation: signed, owner-protected, size-bounded, schema-checked (real DHT peers)."""

import time

import pytest
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from protocols.records import (
    MAX_RECORD_BYTES,
    PeerRecord,
    RunRecordValidator,
    parse_peer_records,
    peers_key,
)

RUN = "records-test"


@pytest.fixture(scope="module")
def peers():
    signers = [RSASignatureValidator(RSAPrivateKey()) for _ in range(2)]
    first = DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[signers[0], RunRecordValidator(RUN)],
    )
    second = DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=[str(a) for a in first.get_visible_maddrs()],
        record_validators=[signers[1], RunRecordValidator(RUN)],
    )
    yield first, second, signers
    second.shutdown()
    first.shutdown()


def _record(dht: DHT, **extra) -> dict:
    return PeerRecord(peer_id=dht.peer_id.to_base58(), role="volunteer", **extra).model_dump()


def _stored(dht: DHT) -> dict:
    found = dht.get(peers_key(RUN), latest=True)
    return parse_peer_records(found.value if found else None)


def test_owner_signed_record_is_accepted(peers) -> None:
    first, second, signers = peers
    ok = second.store(
        peers_key(RUN),
        _record(second, round=2),
        get_dht_time() + 30,
        subkey=signers[1].local_public_key,
    )
    assert ok and _stored(first)[second.peer_id.to_base58()].round == 2


def test_unprotected_subkey_is_rejected(peers) -> None:
    first, second, _ = peers
    assert not second.store(peers_key(RUN), _record(second), get_dht_time() + 30, subkey=b"anyone")


def test_cannot_overwrite_another_owners_record(peers) -> None:
    first, second, signers = peers
    first.store(
        peers_key(RUN),
        _record(first, round=5),
        get_dht_time() + 30,
        subkey=signers[0].local_public_key,
    )
    forged = second.store(
        peers_key(RUN),
        _record(first, round=99),
        get_dht_time() + 60,
        subkey=signers[0].local_public_key,
    )  # signed with the wrong key
    assert not forged
    time.sleep(0.2)
    assert _stored(second)[first.peer_id.to_base58()].round == 5


@pytest.mark.parametrize(
    "value",
    [
        {"peer_id": "x", "role": "volunteer"},
        {"peer_id": "a" * 20, "role": "king"},
        {"peer_id": "a" * 20, "role": "volunteer", "loss": float("nan")},
        {"peer_id": "a" * 20, "role": "volunteer", "task": "t" * 100},
    ],
)
def test_schema_and_size_violations_are_rejected(peers, value: dict) -> None:
    _, second, signers = peers
    assert not second.store(
        peers_key(RUN), value, get_dht_time() + 30, subkey=signers[1].local_public_key
    )


def test_oversized_record_is_rejected_before_parsing() -> None:
    # Checked on the validator directly: hivemind's own store() of a 70 KB value stalls the
    # sender, which is not what this test is about.
    validator = RunRecordValidator(RUN)
    subkey = MSGPackSerializer.dumps(b"[owner:" + b"k" * 32 + b"]")
    key = DHTID.generate(source=peers_key(RUN)).to_bytes()
    small = {"peer_id": "a" * 20, "role": "volunteer"}
    big = dict(small, task="t" * 40, adapters={str(i): "x" * 5000 for i in range(14)})

    def record(value: dict) -> DHTRecord:
        return DHTRecord(key, subkey, MSGPackSerializer.dumps(value), get_dht_time() + 30)

    assert validator.validate(record(small))
    assert len(record(big).value) > MAX_RECORD_BYTES
    assert not validator.validate(record(big))
    assert validator.validate(DHTRecord(b"other", subkey, b"\x00" * 100_000, 0.0))
