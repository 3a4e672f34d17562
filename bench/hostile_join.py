"""`swarmtune join` with a hostile averager: the volunteer an attacker would run, made the way
an attacker would make it (a few lines patched at import time). For bench/attacks.py only.

Usage: .venv/bin/python bench/hostile_join.py ATTACK [join arguments...]

ALIE and IPM need the honest members' deltas; on the network the attacker only has those of the
previous round (every member receives every contribution), so it uses them; in its first round
it has only its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import swarmtune.node.roles.volunteer as volunteer  # noqa: E402
from swarmtune import cli  # noqa: E402
from swarmtune.protocols.admission import Gate  # noqa: E402
from swarmtune.protocols.group import GroupResult, MemberMeta  # noqa: E402
from tests.attackers.adversaries import ADVERSARIES, Adversary  # noqa: E402
from tests.attackers.averager import HostileAverager  # noqa: E402


def make_attacker(adversary: Adversary) -> type[HostileAverager]:
    """A HostileAverager class that forges with `adversary` in every exchange."""
    gen = torch.Generator().manual_seed(1234)

    class Attacker(HostileAverager):
        last_honest: list[dict[str, torch.Tensor]] = []

        def exchange(  # type: ignore[override]
            self,
            tensors: Mapping[str, torch.Tensor],
            meta: MemberMeta,
            timeout: float,
            moved_on: Callable[[], bool] = lambda: False,
            **options: Any,
        ) -> GroupResult:
            own = {k: v.clone() for k, v in tensors.items()}
            self.forgery = adversary.forge(own, self.last_honest, meta.weight, gen)
            out = super().exchange(tensors, meta, timeout, moved_on, **options)
            self.last_honest = [c for p, c in out.contributions.items() if p != meta.peer]
            return out

    return Attacker


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ADVERSARIES:
        print(
            "usage: bench/hostile_join.py ATTACK [join arguments...]; attacks: "
            + ", ".join(sorted(ADVERSARIES)),
            file=sys.stderr,
        )
        return 2
    attack, join_args = argv[0], argv[1:]
    volunteer.GroupAverager = make_attacker(ADVERSARIES[attack]())  # type: ignore[misc]

    def no_own_check(manifest: Any, peer_id: str, ticket: str) -> Gate | None:
        # a modified client skips the check of its own ticket and joins anyway
        if volunteer.parse_config(manifest.config).admission.policy == "open":
            return None
        return Gate(manifest.coordinator_key, manifest.run_id)

    volunteer.admission_gate = no_own_check  # type: ignore[assignment]
    # ... and never reads its own ticket's expiry (an unadmitted one has none to read)
    volunteer.ticket_warning = lambda expires, now: None  # type: ignore[assignment]
    volunteer.read_ticket = lambda text: SimpleNamespace(expires=float("inf"))  # type: ignore
    return cli.main(["join", *join_args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
