"""Signatures by a peer's libp2p identity (docs/design.md, 8. Trust, "Who said it").

A libp2p peer id is the sha256 multihash of the peer's public key, so a public key plus a
signature is self-certifying: anyone can check that the key belongs to the claimed peer id and
that the peer signed the bytes. Nobody can forge another peer's id (the threat model), so
nobody can sign in its name. Signatures use RSA PKCS#1 v1.5 with SHA-256 over a domain-separated
message (`purpose|data`), so a signature made for one purpose never passes for another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path

import base58
import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

MAX_KEY_CHARS = 1024  # base64 of a DER RSA public key up to 4096 bits
MAX_SIG_CHARS = 1024
RSA_KEY = 0  # libp2p's KeyType enum: RSA = 0 (Ed25519 = 1, Secp256k1 = 2, ECDSA = 3)


class IdentityError(ValueError):
    """An identity file that is not a libp2p RSA key; one line."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def varint(value: int) -> bytes:
    """An unsigned protobuf/multiformats varint: 7 bits a byte, low bits first."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _readvarint(blob: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while at < len(blob) and shift < 64:
        byte = blob[at]
        value, at, shift = value | (byte & 0x7F) << shift, at + 1, shift + 7
        if not byte & 0x80:
            return value, at
    raise ValueError("truncated or overlong varint")


def key_message(key_type: int, data: bytes) -> bytes:
    """libp2p's PublicKey / PrivateKey protobuf message (crypto.proto: field 1 `Type`, a varint;
    field 2 `Data`, bytes), as go-libp2p and hivemind write it: both fields, in that order."""
    return b"\x08" + varint(key_type) + b"\x12" + varint(len(data)) + data


def parse_key_message(blob: bytes) -> tuple[int, bytes]:
    """(key type, key bytes) of a libp2p key message; ValueError for anything else."""
    fields: dict[int, int | bytes] = {}
    at = 0
    while at < len(blob):
        tag, at = _readvarint(blob, at)
        if tag == 0x08:
            fields[1], at = _readvarint(blob, at)
        elif tag == 0x12:
            size, at = _readvarint(blob, at)
            if at + size > len(blob):
                raise ValueError("key data runs past the end of the message")
            fields[2], at = blob[at : at + size], at + size
        else:
            raise ValueError(f"unexpected field tag {tag} in a libp2p key message")
    key_type, data = fields.get(1), fields.get(2)
    if not isinstance(key_type, int) or not isinstance(data, bytes):
        raise ValueError("a libp2p key message needs a type and data")
    return key_type, data


def peer_id_of_key(public_der: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key (DER SubjectPublicKeyInfo)."""
    encoded = key_message(RSA_KEY, public_der)
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode("ascii")


@dataclass(frozen=True)
class Signed:
    """A signature and the public key (both base64) that makes it checkable against a peer id."""

    key: str
    sig: str


class Identity:
    """A peer's libp2p private key, for signing in its name."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._key = private_key
        self.public_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = _b64(self.public_der)
        self.peer_id = peer_id_of_key(self.public_der)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """The identity in a libp2p key file (what hivemind's P2P.generate_identity writes)."""
        try:
            key_type, der = parse_key_message(path.read_bytes())
            key = serialization.load_der_private_key(der, password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise IdentityError(f"{path} is not a libp2p identity key ({exc})") from None
        if key_type != RSA_KEY or not isinstance(key, rsa.RSAPrivateKey):
            raise IdentityError(f"{path} is not an RSA libp2p identity key")
        return cls(key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity (tests and in-process peers)."""
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def save(self, path: Path) -> None:
        """Write this identity as a libp2p key file (the format P2P(identity_path=...) reads)."""
        der = self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        path.write_bytes(key_message(RSA_KEY, der))
        path.chmod(0o400)

    def sign(self, purpose: str, data: bytes) -> Signed:
        """Our signature over `purpose|data`."""
        signature = self._key.sign(_message(purpose, data), padding.PKCS1v15(), hashes.SHA256())
        return Signed(self.public_key, _b64(signature))


def _message(purpose: str, data: bytes) -> bytes:
    return b"swarmtune/" + purpose.encode() + b"|" + data


def owns(peer_id: str, key: str) -> bool:
    """True when `key` (base64 DER) is the public key of libp2p peer `peer_id`."""
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
        return False
    try:
        return peer_id_of_key(base64.b64decode(key, validate=True)) == peer_id
    except (binascii.Error, ValueError):
        return False


def signed_with(signed: Signed, purpose: str, data: bytes) -> bool:
    """True when `signed.sig` is a signature of `purpose|data` by `signed.key` (whoever owns
    that key: check it with `owns`); False for anything malformed."""
    if not (isinstance(signed.key, str) and isinstance(signed.sig, str)):
        return False
    if len(signed.key) > MAX_KEY_CHARS or len(signed.sig) > MAX_SIG_CHARS:
        return False
    try:
        key = serialization.load_der_public_key(base64.b64decode(signed.key, validate=True))
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        signature = base64.b64decode(signed.sig, validate=True)
        key.verify(signature, _message(purpose, data), padding.PKCS1v15(), hashes.SHA256())
    except (binascii.Error, ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify(peer_id: str, signed: Signed, purpose: str, data: bytes) -> bool:
    """True when `signed.key` is `peer_id`'s key and it signed `purpose|data`."""
    return owns(peer_id, signed.key) and signed_with(signed, purpose, data)
