"""Every use of a private hivemind name outside a subclass's own overrides, in one place.

pyproject.toml pins hivemind exactly (1.1.12): these names are not part of its API and may
change in any other version. tests/protocols/test_hivemind_internals.py checks each one
(and GatedAverager's overrides, protocols/matchmaking.py) by name, so that a hivemind that
renames one fails there, loudly, instead of quietly in a running swarm.
"""

from __future__ import annotations

import logging
from typing import Any

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID

log = logging.getLogger("swarmtune.swarm")


def p2pd_args(original: Any) -> Any:
    """Wrap hivemind's p2pd argument builder: static relays without background discovery."""

    def build(*args: Any, **kwargs: Any) -> list[str]:
        if kwargs.get("autoRelay") and kwargs.get("trustedRelays"):
            kwargs["relayDiscovery"] = False
        return original(*args, **kwargs)

    build.swarmtune_wrapped = True  # type: ignore[attr-defined]
    return build


def install_p2pd_args() -> None:
    """Apply p2pd_args to hivemind's P2P once per process (forked DHT processes inherit it).
    Private: P2P._make_process_args (hivemind has no option for this p2pd flag)."""
    current = P2P._make_process_args  # noqa: SLF001
    if not getattr(current, "swarmtune_wrapped", False):
        P2P._make_process_args = staticmethod(p2pd_args(current))  # noqa: SLF001


async def daemon_connect(p2p: P2P, peer: PeerID, addrs: list[Any]) -> None:
    """Ask our p2pd to connect to `peer` at `addrs` (a relay circuit address: reach.py).
    Private: P2P._client, the daemon's control client (no public API connects by address)."""
    await p2p._client.connect(peer, addrs)  # noqa: SLF001


def set_target_group_size(averager: DecentralizedAverager, size: int | None) -> None:
    """Make the averager's leader assemble its group once `size` members are in (None: wait
    out the matching window). Private: DecentralizedAverager._matchmaking and
    Matchmaking.target_group_size (hivemind sets the size only at construction)."""
    averager._matchmaking.target_group_size = size  # noqa: SLF001


def step_control(averager: DecentralizedAverager) -> Any:
    """The StepControl of the averager's step in matchmaking now (None between steps): its
    `data_for_gather` is what we send with our join answers. Private:
    Matchmaking.step_control."""
    return averager._matchmaking.step_control  # noqa: SLF001


class QuietDHT(DHT):
    """hivemind's DHT process, ending with one line instead of a traceback when its pipe from
    the main process breaks mid-request: a terminal's Ctrl+C stops the main process while a
    thread of it (an overlapped exchange) still hands the DHT a request, and the request's
    shared pipe end can no longer be fetched from the exiting process."""

    def run(self) -> None:
        try:
            super().run()
        except (EOFError, ConnectionError) as exc:
            log.info("DHT process: the main process went away mid-request (%r); ending", exc)
