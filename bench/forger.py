"""A peer that writes, instead of training: forged states and adapter offers, the way an attacker
who joined a run would announce them. For bench/attacks.py and tests/integration only.

Usage: .venv/bin/python bench/forger.py --initial-peers MADDR --run RUN --workdir DIR
           [--ahead N] [--offer-round R] [--serve/--no-serve] [--seconds S]

Every 0.5 s it reads the honest volunteers' records, fetches the newest honest state and
adapter, and announces, under its own (valid) identity:
- that state with every lora_B multiplied by -3, at the honest round + N (--ahead; 0: the
  same round), with a round certificate only it signed, linked to the honest state;
- the matching adapter bundle offered as `global` at round R (--offer-round), naming that
  state;
and serves both (or nothing, with --no-serve: an announcement with nothing behind it).
It prints one JSON line once it is in the swarm ({"ready": its peer id}) and one per forgery it
announced (also to --out), and exits after --seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from swarmtune.node.engine.certify import round_body  # noqa: E402
from swarmtune.node.engine.state import GroupState, decode_state, encode_state  # noqa: E402
from swarmtune.protocols.certificates import Certificate, decode_chain, encode_chain, sign_body  # noqa: E402
from swarmtune.protocols.records import AdapterOffer, PeerRecord, VoteRecord  # noqa: E402
from swarmtune.protocols.swarm import SwarmNode  # noqa: E402
from swarmtune.protocols.transfer import TransferError, pack_files, unpack_files  # noqa: E402


def negated(state: GroupState, round_: int) -> GroupState:
    """The state with every lora_B x -3 (the adapter's effect reversed and tripled)."""
    params = {k: -3 * v if "lora_B" in k else v.clone() for k, v in state.params.items()}
    return GroupState(round_, params, dict(state.outer_state), dict(state.offences))


def negated_bundle(bundle: bytes) -> bytes:
    """An honest adapter bundle with every lora_B x -3."""
    files = unpack_files(bundle)
    tensors = st_load(files["adapter_model.safetensors"])
    forged = {k: -3 * v if "lora_B" in k else v for k, v in tensors.items()}
    files["adapter_model.safetensors"] = st_save(forged)
    return pack_files(files)


def forge_once(node: SwarmNode, run: str, args: argparse.Namespace, done: set[int]) -> None:
    """Announce a forgery of the newest honest state, once per honest round."""
    honest = {  # (other forgers call their task "forger")
        p: r
        for p, r in node.records.peers().items()
        if r.role == "volunteer" and r.digest and p != node.peer_id and r.task != "forger"
    }
    if not honest:
        return
    source = max(honest.values(), key=lambda r: r.round)
    if source.round in done:
        return
    state = decode_state(node.routes.fetch(source.peer_id, "state", timeout=30))
    chain = decode_chain(node.routes.fetch(source.peer_id, "chain", timeout=30))
    bundle = negated_bundle(node.routes.fetch(source.peer_id, "adapter:global", timeout=30))
    forged = negated(state, state.round + args.ahead)
    body = round_body(run, state.digest(), forged, [(node.peer_id, "", 1.0)])
    vote = sign_body(node.identity, body, node.peer_id)
    proof = Certificate(body, (vote,))
    if args.serve:
        node.blobs.publish("state", encode_state(forged))
        node.blobs.publish("chain", encode_chain([*chain, proof]))
        node.blobs.publish("adapter:global", bundle)
        node.blobs.publish("cert:global", encode_chain([proof]))
    offer = AdapterOffer(
        round=args.offer_round,
        sha256=hashlib.sha256(bundle).hexdigest(),
        size=len(bundle),
        state=forged.digest(),
    )
    record = PeerRecord(
        peer_id=node.peer_id,
        role="volunteer",
        round=forged.round,
        digest=forged.digest(),
        vote=VoteRecord(body=body.sha256(), sig=vote.sig),
        adapters={"global": offer},
        task="forger",
    )
    node.records.set_record(record)
    done.add(source.round)
    line = {"honest_round": state.round, "forged_round": forged.round, "digest": forged.digest()}
    say(args, line)


def say(args: argparse.Namespace, line: dict) -> None:
    """One JSON line to stdout (and --out)."""
    text = json.dumps(line)
    print(text, flush=True)
    if args.out is not None:
        with open(args.out, "a") as handle:
            handle.write(text + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--ahead", type=int, default=3)
    parser.add_argument("--offer-round", type=int, default=1_000_000)
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--out", type=Path, help="also append each JSON line to this file")
    args = parser.parse_args()
    node = SwarmNode(initial_peers=args.initial_peers, workdir=args.workdir, run_id=args.run)
    say(args, {"ready": node.peer_id})  # in the swarm: a harness may start the honest peers now
    done: set[int] = set()
    deadline = time.monotonic() + args.seconds
    try:
        while time.monotonic() < deadline:
            try:
                forge_once(node, args.run, args, done)
            except (TransferError, TimeoutError, ValueError) as exc:
                say(args, {"error": str(exc)[:200]})
            time.sleep(0.5)
    finally:
        node.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
