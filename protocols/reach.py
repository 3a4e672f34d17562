"""Reachability: whether other machines can dial a peer, and how to reach one they cannot.

A volunteer at home is usually behind NAT: it can dial out, nobody can dial in. On start a
volunteer asks the coordinator to dial it back (DIALBACK_PROTOCOL below). The coordinator opens a
plain TCP connection to the address it sees the volunteer's connection come from, at the
port the volunteer listens on, and says whether that worked. Only that address: a peer cannot
make the coordinator probe anyone else.

A peer nobody can dial runs in relay mode (docs/design.md, 10. Across the internet):
- its p2pd reserves a slot on the coordinator's circuit relay and other peers connect to it
  through `RELAY/p2p-circuit`, which carries matchmaking and other small messages;
- its blobs (contributions, states, adapters) reach others through the coordinator, which
  fetches them over the volunteer's own outbound connection (`via/PEER/NAME`, served by
  protocols/transfer.py's BlobServer). The fetcher checks the committed sha256 as always, so
  the coordinator can delay a blob but not alter it.

Three things in hivemind 1.1.12's p2pd that this module works around:
- With `-autoRelay` p2pd also discovers relays in the background, and go-libp2p then waits out a
  3-minute boot delay before it reserves a slot on a relay it was given. `p2pd_args` (protocols/hivemind_private.py) turns
  discovery off whenever static relays are given (measured: reservation at once, not 180 s).
- The relay it runs applies libp2p's default limits to each relayed connection (128 KiB and 2
  minutes, seen resetting a 16 MiB transfer at exactly 131072 bytes), whatever its
  `-relayDataLimit` says: that relay races the configured one for the protocol handler. Hence
  blobs never travel over a circuit.
- hivemind's Python multiaddr encodes `/p2p/ID` as a CID, which p2pd's Go parser rejects inside
  a circuit address ("length greater than remaining number of bytes"); `CircuitAddr` writes
  the multihash form that Go expects.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from typing import Any

from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.utils.multiaddr import Multiaddr

from swarmtune.protocols.hivemind_private import daemon_connect
from swarmtune.protocols.identity import varint
from swarmtune.protocols.transfer import TransferError, read_frame, write_frame

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "swarmtune.dialback.v1"
DIAL_TIMEOUT = 3.0  # seconds the coordinator waits for a TCP handshake with the asking peer
REQUEST_TIMEOUT = 10.0
MAX_FRAME = 1024
_P2P_CODE, _CIRCUIT_CODE = 421, 290  # multicodec table: p2p, p2p-circuit

REACH_MODES = ("auto", "direct", "relay")


class CircuitAddr:
    """`RELAY_MADDR/p2p-circuit` in the binary form p2pd parses (see the module docstring);
    RELAY_MADDR may be just `/p2p/<relay id>` for a relay p2pd already knows how to reach.
    It has what the p2pd client uses of a Multiaddr: `to_bytes()` and `str()`."""

    def __init__(self, relay_maddr: str) -> None:
        base, sep, relay_id = relay_maddr.partition("/p2p/")
        if not sep:
            raise ValueError(f"{relay_maddr!r} is not an address ending in /p2p/<peer id>")
        multihash = PeerID.from_base58(relay_id).to_bytes()
        self._bytes = (
            (Multiaddr(base).to_bytes() if base else b"")  # "": p2pd knows where the relay is
            + varint(_P2P_CODE)
            + varint(len(multihash))
            + multihash
            + varint(_CIRCUIT_CODE)
        )
        self._text = f"{relay_maddr}/p2p-circuit"

    def to_bytes(self) -> bytes:
        return self._bytes

    def __str__(self) -> str:
        return self._text


async def connect_through(p2p: P2P, peer: PeerID, relay_maddr: str) -> None:
    """Open a relayed connection to `peer` (which holds a reservation on that relay); streams
    to it then use that connection. Raises P2PDaemonError (or its ControlFailure) if not."""
    await daemon_connect(p2p, peer, [CircuitAddr(relay_maddr)])


async def _write(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
    await write_frame(writer, json.dumps(payload).encode())


async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
    value = json.loads(await read_frame(reader, MAX_FRAME, "dial-back"))
    if not isinstance(value, dict):
        raise ValueError("frame is not a JSON object")
    return value


def observed_ip(addrs: list[Any]) -> str | None:
    """The IPv4 address a direct connection comes from (None for relayed or other kinds)."""
    for addr in addrs:
        parts = str(addr).split("/")
        if (
            len(parts) >= 5
            and parts[1] == "ip4"
            and parts[3] == "tcp"
            and "p2p-circuit" not in parts
        ):
            try:
                return str(ipaddress.IPv4Address(parts[2]))
            except ValueError:
                continue
    return None


async def tcp_dial(ip: str, port: int, timeout: float = DIAL_TIMEOUT) -> str | None:
    """None if a TCP handshake with ip:port completes within `timeout`, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except asyncio.TimeoutError:
        return f"no answer from {ip}:{port} in {timeout:g} s"
    except OSError as exc:
        return f"{ip}:{port}: {exc.strerror or exc}"
    writer.close()
    return None


class DialBackServer:
    """The coordinator's side: dials a peer back at the address its connection comes from."""

    def __init__(self, p2p: P2P) -> None:
        self._p2p = p2p

    async def start(self) -> None:
        await self._p2p.add_binary_stream_handler(DIALBACK_PROTOCOL, self._handle)

    async def _handle(
        self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await asyncio.wait_for(_read(reader), REQUEST_TIMEOUT)
            port = request.get("port")
            if type(port) is not int or not 0 < port < 65536:
                await _write(writer, {"ok": False, "error": "bad port"})
                return
            peers = await self._p2p.list_peers()
            addrs: list[Any] = next((list(p.addrs) for p in peers if p.peer_id == info.peer_id), [])
            ip = observed_ip(addrs)
            if ip is None:
                await _write(writer, {"ok": False, "error": "no direct connection from you"})
                return
            problem = await tcp_dial(ip, port)
            await _write(
                writer, {"ok": problem is None, "address": f"{ip}:{port}", "error": problem or ""}
            )
            await asyncio.wait_for(reader.read(1), REQUEST_TIMEOUT)  # the asking side closes first
        except Exception as exc:  # noqa: BLE001 - a misbehaving peer never takes the handler down
            log.debug("dial-back for %s failed: %r", info.peer_id, exc)
        finally:
            writer.close()


async def ask_dial_back(p2p: P2P, peer: PeerID, port: int) -> tuple[bool | None, str]:
    """Ask `peer` to dial us back at `port`: (True, address) when it could, (False, why) when
    it could not, (None, why) when it did not answer (an older coordinator, a broken link)."""
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(peer, DIALBACK_PROTOCOL)
    except (P2PDaemonError, OSError) as exc:
        return None, f"no dial-back service: {str(exc)[:120]}"
    try:
        await _write(writer, {"port": port})
        answer = await asyncio.wait_for(_read(reader), REQUEST_TIMEOUT + DIAL_TIMEOUT)
    except (
        asyncio.TimeoutError,
        asyncio.IncompleteReadError,
        ConnectionError,
        ValueError,
        TransferError,
    ) as exc:
        return None, f"no dial-back answer: {type(exc).__name__}"
    finally:
        writer.close()
    if answer.get("ok") is True:
        return True, str(answer.get("address", ""))[:80]
    return False, str(answer.get("error") or answer.get("address") or "unreachable")[:160]
