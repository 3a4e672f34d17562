"""The DHT's validator for one run's keys (hivemind): what protocols/records.py describes.

Every record under the run's keys must be signed by its owner (hivemind's RSASignatureValidator
checks the signature; this validator requires the owner marker), be at most MAX_RECORD_BYTES,
and match its schema.
"""

from __future__ import annotations

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from pydantic import BaseModel, ValidationError

from swarmtune.protocols.records import (
    MAX_RECORD_BYTES,
    OWNER_SUBKEY,
    ClusterRecord,
    ManifestRecord,
    PeerRecord,
    RevocationRecord,
    SignatureRecord,
    clusters_key,
    manifest_key,
    peers_key,
    revoked_key,
    signatures_key,
)


class RunRecordValidator(RecordValidatorBase):
    """Rejects unsigned, oversized or schema-violating records under this run's keys."""

    def __init__(self, run_id: str) -> None:
        self._schemas: dict[bytes, type[BaseModel]] = {
            DHTID.generate(source=manifest_key(run_id)).to_bytes(): ManifestRecord,
            DHTID.generate(source=peers_key(run_id)).to_bytes(): PeerRecord,
            DHTID.generate(source=signatures_key(run_id)).to_bytes(): SignatureRecord,
            DHTID.generate(source=clusters_key(run_id)).to_bytes(): ClusterRecord,
            DHTID.generate(source=revoked_key(run_id)).to_bytes(): RevocationRecord,
        }

    def validate(self, record: DHTRecord) -> bool:
        """True for other keys; for ours: owner-protected subkey, bounded size, valid schema."""
        schema = self._schemas.get(record.key)
        if schema is None:
            return True
        if len(record.value) > MAX_RECORD_BYTES or record.subkey is None:
            return False
        subkey = MSGPackSerializer.loads(record.subkey)
        if not isinstance(subkey, bytes) or not OWNER_SUBKEY.match(subkey):
            return False
        try:
            schema.model_validate(MSGPackSerializer.loads(record.value))
        except (ValidationError, ValueError, TypeError):
            return False
        return True

    @property
    def priority(self) -> int:
        """Run after RSASignatureValidator (priority 10) has stripped the signature."""
        return 5

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Each run keeps its own validator."""
        return False


def owner_subkey(validator: RSASignatureValidator) -> bytes:
    """The subkey that marks a record as owned (and signed) by this peer."""
    return validator.local_public_key
