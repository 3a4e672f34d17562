"""A peer's signed records in the DHT: its heartbeat record, the run's manifest, and reads of
everyone's records (the schemas: protocols/records.py; the DHT's check: validator.py)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from swarmtune.protocols.identity import Identity
from swarmtune.protocols.records import (
    PEER_TTL,
    ManifestRecord,
    PeerRecord,
    identity_proof,
    manifest_key,
    parse_peer_records,
    peers_key,
    with_fields,
)
from swarmtune.protocols.validator import RunRecordValidator, owner_subkey

log = logging.getLogger("swarmtune.swarm")
DHT_GET_TIMEOUT = 10.0


class RecordStore:
    """Stores this peer's records under its owner subkey and reads the run's records."""

    def __init__(
        self, dht: DHT, signer: RSASignatureValidator, identity: Identity, run_id: str | None
    ) -> None:
        self.dht, self.signer = dht, signer
        proof = identity_proof(identity, owner_subkey(signer))
        self._record_key = {"key": proof.key, "key_sig": proof.sig}
        self.run_id = run_id
        self.coordinator = ""  # the manifest's coordinator, once known (set_run)
        self.dropped_records = 0  # records in the last read that lied (parse_peer_records)
        self.unreadable_records = 0  # and those that were no peer record we can read
        self.store_failure = ""  # why storing our record last failed ("": it worked)
        self._record: PeerRecord | None = None
        self._reach: dict[str, Any] = {}  # how others reach us, stamped on every store
        self._read: tuple[float, dict[str, PeerRecord]] | None = None  # (when, the last read)
        self._closed = threading.Event()

    def set_run(self, run_id: str, coordinator: str = "") -> None:
        """Start validating this run's records (for peers that learn the run from the manifest);
        `coordinator`: the peer id the manifest names, the only one whose record may say so."""
        self.coordinator = coordinator or self.coordinator
        if self.run_id is None:
            self.run_id = run_id
            self.dht.add_validators([RunRecordValidator(run_id)])

    def set_reach(self, reach: str, relay: str, serves_relay: bool) -> None:
        """How others reach us (reach mode, our relay's multiaddr, whether we relay), written
        into our record from the next store on."""
        self._reach = {"reach": reach, "relay": relay, "serves_relay": serves_relay}

    def publish_manifest(self, manifest: ManifestRecord) -> None:
        """Store the manifest, signed, in the DHT (the node also serves it over p2p)."""
        ok = self.dht.store(
            manifest_key(manifest.run_id),
            manifest.model_dump(),
            expiration_time=get_dht_time() + 3600,
            subkey=owner_subkey(self.signer),
        )
        if not ok:
            log.warning("manifest was not stored in the DHT (no peers accepted it yet)")

    def set_record(self, record: PeerRecord, store: bool = True) -> None:
        """Make `record` this peer's heartbeat record (the role's: it says what the peer is);
        stored now, or with the next update that stores."""
        self._record = record
        if store:
            self.store_record()

    @property
    def record(self) -> PeerRecord | None:
        """Our heartbeat record as last set or updated."""
        return self._record

    def update_record(self, store: bool = True, **fields: Any) -> None:
        """Change fields of our record (validated: protocols/records.py, with_fields); stored
        now, or (store=False) with the next update that stores or the next heartbeat."""
        if self._record is None:
            raise RuntimeError("update_record before set_record")
        self._record = with_fields(self._record, **fields)
        if store:
            self.store_record()

    def store_record(self) -> None:
        """Store our heartbeat record again (with a fresh time stamp); the heartbeat calls it."""
        if self._record is None or self.run_id is None:
            return
        self._record = with_fields(
            self._record, stored_at=time.time(), **self._reach, **self._record_key
        )
        future = self.dht.store(
            peers_key(self.run_id),
            self._record.model_dump(),
            expiration_time=get_dht_time() + PEER_TTL,
            subkey=owner_subkey(self.signer),
            return_future=True,
        )
        future.add_done_callback(self._record_stored)

    def _record_stored(self, future: Any) -> None:
        """Say when storing our record starts failing, and when it works again (not every
        beat): while it fails, other peers see none of this peer's progress."""
        try:
            why = "" if future.result() else "no DHT peer accepted it"
        except Exception as exc:  # noqa: BLE001 - whatever the DHT raised is the reason
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if why == self.store_failure or self._closed.is_set():
            return
        if why:
            log.warning("storing our peer record failed (%s): other peers do not see this"
                        " peer's progress until a store succeeds", why)  # fmt: skip
        else:
            log.info("our peer record is stored again")
        self.store_failure = why

    def peers(self) -> dict[str, PeerRecord]:
        """Live peer records of this run, by peer id (read from the DHT now)."""
        if self.run_id is None:
            return {}
        found = self._get(peers_key(self.run_id))
        records, self.dropped_records, self.unreadable_records = parse_peer_records(
            found.value if found is not None else None, self.coordinator
        )
        if found is not None:
            self._read = (time.monotonic(), records)
        return records

    def recent(self, max_age: float) -> dict[str, PeerRecord] | None:
        """The last read of the run's records if it is at most `max_age` seconds old, else a
        new one (blob routing asks: a round's own read is usually seconds old); None while no
        read has answered (no run yet, or the DHT did not answer)."""
        if self._read is None or time.monotonic() - self._read[0] > max_age:
            self.peers()
        return self._read[1] if self._read is not None else None

    def _get(self, key: str) -> Any:
        """The newest value under `key`, or None when the DHT does not answer within
        DHT_GET_TIMEOUT (a busy swarm must not freeze a round loop or a Ctrl+C), or at once
        when its process is gone (a terminal's Ctrl+C signals it too)."""
        if not self.dht.is_alive():
            return None
        future = self.dht.get(key, latest=True, return_future=True)
        try:
            return future.result(timeout=DHT_GET_TIMEOUT)
        except TimeoutError:
            future.cancel()
            log.debug("DHT get of %s timed out", key)
            return None

    def store_owned(self, key: str, value: dict[str, Any], ttl: float) -> None:
        """Store a record under our owner subkey (signed; nobody else can overwrite it)."""
        self.dht.store(
            key,
            value,
            expiration_time=get_dht_time() + ttl,
            subkey=owner_subkey(self.signer),
            return_future=True,
        )

    def get_owned(self, key: str) -> dict[bytes, Any]:
        """Every owner's record under `key`, by owner subkey (values as stored, unvalidated)."""
        found = self._get(key)
        if found is None or not isinstance(found.value, dict):
            return {}
        return {k: getattr(v, "value", None) for k, v in found.value.items()}

    @property
    def owner_key(self) -> str:
        """This peer's owner subkey, as text (published in the manifest by the coordinator)."""
        return owner_subkey(self.signer).decode("ascii", errors="replace")

    def close(self) -> None:
        """Stop reporting on stores (the node is leaving)."""
        self._closed.set()
