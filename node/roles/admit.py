"""Admission for token runs, on the coordinator's machine: `swarmtune admit` issues a ticket
for a peer id, `swarmtune revoke` withdraws one (the running coordinator publishes the list
within a second), `swarmtune id` tells a volunteer its peer id before it joins.

The coordinator's work dir holds what these need: its records key (it signs tickets) and the
manifest it published (`manifest.json`, for the run id). Revocations are kept in
`revoked.txt`, one peer id per line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import ValidationError

from swarmtune.node.config import parse_config
from swarmtune.node.engine.checkpoint import atomic_write, set_aside
from swarmtune.protocols.admission import issue_ticket, read_ticket
from swarmtune.protocols.records import RevocationRecord, revoked_key
from swarmtune.protocols.swarm import SwarmError, SwarmNode, identity_peer_id, load_or_create_key

MANIFEST_FILE = "manifest.json"
REVOKED_FILE = "revoked.txt"
ADDRESSES_FILE = "addresses.json"
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")  # base58


def _check_peer(peer: str) -> str:
    if not _PEER_ID.match(peer):
        raise SwarmError(f"{peer!r} is not a peer id (a volunteer prints it: `swarmtune id`)")
    return peer


def _run_of(workdir: Path) -> dict:
    path = workdir / MANIFEST_FILE
    if not (workdir / "records.key").exists() or not path.exists():
        raise SwarmError(f"{workdir} is not a coordinator's work dir (run `bootstrap` there first)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise SwarmError(f"{path} is corrupt; restart `bootstrap` to rewrite it") from None


def admit(workdir: Path, peer: str, hours: float | None = None) -> str:
    """A ticket admitting `peer` to the coordinator's run; prints nothing."""
    manifest = _run_of(workdir)
    ttl_h = hours if hours is not None else parse_config(manifest["config"]).admission.ticket_hours
    key = load_or_create_key(workdir / "records.key")
    return issue_ticket(key, manifest["run_id"], _check_peer(peer), ttl_h * 3600)


def revoke(workdir: Path, peer: str) -> list[str]:
    """Add `peer` to the coordinator's revocation list; returns the whole list."""
    _run_of(workdir)
    revoked = sorted(set(read_revoked(workdir)) | {_check_peer(peer)})
    atomic_write(workdir / REVOKED_FILE, ("\n".join(revoked) + "\n").encode())
    return revoked


def read_revoked(workdir: Path) -> list[str]:
    """The revoked peer ids (lines that are not peer ids are ignored)."""
    try:
        lines = (workdir / REVOKED_FILE).read_text().split()
    except FileNotFoundError:
        return []
    return sorted({line for line in lines if _PEER_ID.match(line)})


def save_manifest(workdir: Path, manifest_json: str) -> None:
    """Keep the published manifest next to the coordinator's key (for `admit`)."""
    atomic_write(workdir / MANIFEST_FILE, manifest_json.encode())


def load_ticket(value: str) -> str:
    """A --ticket argument: the ticket itself, or @FILE holding it."""
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text().strip()
        except OSError as exc:
            raise SwarmError(f"cannot read the ticket file {value[1:]}: {exc.strerror}") from None
    try:
        read_ticket(value)
    except ValueError as exc:
        raise SwarmError(f"--ticket: {exc}") from None
    return value


def read_revocations(node: SwarmNode, run_id: str, coordinator_key: str) -> set[str]:
    """Peers whose tickets the run's coordinator revoked, from its DHT record (nobody else
    can write under the coordinator's owner subkey)."""
    raw = node.records.get_owned(revoked_key(run_id)).get(coordinator_key.encode())
    try:
        return set(RevocationRecord.model_validate(raw).revoked)
    except ValidationError:
        return set()


def peer_id(workdir: Path) -> str:
    """The peer id a volunteer started with this work dir has."""
    return identity_peer_id(workdir)


class AddressLedger:
    """`admission.policy: address` on the coordinator: which peer ids each IPv4 address was
    given tickets for (kept in the work dir, so a restart forgets nobody), and the grant that
    protocols/ticket_desk.py calls: a ticket while the address holds fewer than `limit`
    identities (a peer that asks again gets a fresh one)."""

    def __init__(self, workdir: Path, limit: int) -> None:
        self.path = workdir / ADDRESSES_FILE
        self.limit = limit
        self.workdir = workdir
        self.held: dict[str, list[str]] = {}
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                self.held = {str(a): [str(p) for p in ps] for a, ps in raw.items()}
            except (OSError, ValueError, AttributeError, TypeError):
                set_aside(self.path, "is corrupt; address counts start over")

    def grant(self, peer: str, address: str) -> tuple[str, str]:
        """(ticket, "") for `peer` asking from `address`, or ("", why not)."""
        held = self.held.setdefault(address, [])
        if peer not in held:
            if len(held) >= self.limit:
                return "", (
                    f"address {address} already holds {len(held)} identities in this run"
                    f" (admission.identities_per_address = {self.limit})"
                )
            held.append(peer)
            atomic_write(self.path, json.dumps(self.held, sort_keys=True).encode())
        return admit(self.workdir, peer), ""
