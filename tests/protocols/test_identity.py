"""The libp2p key file and peer id, written without hivemind, checked against hivemind's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from swarmtune.protocols.identity import (
    RSA_KEY,
    Identity,
    IdentityError,
    key_message,
    parse_key_message,
)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16_383, 16_384, 70_000])
def test_the_key_message_is_the_protobuf_libp2p_reads(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    for message in (crypto_pb2.PublicKey, crypto_pb2.PrivateKey):
        reference = message(key_type=crypto_pb2.RSA, data=data).SerializeToString()
        assert key_message(RSA_KEY, data) == reference
        assert parse_key_message(reference) == (RSA_KEY, data)
    other = crypto_pb2.PublicKey(key_type=crypto_pb2.Ed25519, data=data).SerializeToString()
    assert parse_key_message(other) == (crypto_pb2.Ed25519, data)


def test_a_saved_identity_has_the_peer_id_hivemind_derives(tmp_path: Path) -> None:
    identity = Identity.generate()
    identity.save(tmp_path / "identity.key")
    blob = (tmp_path / "identity.key").read_bytes()
    assert PeerID.from_identity(blob).to_base58() == identity.peer_id
    assert Identity.load(tmp_path / "identity.key").peer_id == identity.peer_id


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x08\x00",  # no data
        b"\x12\x05abc",  # data runs past the end
        b"\x08\x00\x12\x03abc\x1a\x00",  # a field libp2p's key message does not have
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # an endless varint
        b"\x08\x00\x12\x03abc",  # data that is no DER key
    ],
)
def test_a_file_that_is_not_a_libp2p_key_is_one_error_line(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(blob)
    with pytest.raises(IdentityError, match="is not a libp2p identity key") as caught:
        Identity.load(path)
    assert "\n" not in str(caught.value)
