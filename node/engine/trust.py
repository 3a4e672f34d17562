"""Repeat offenders (docs/design.md, 8. Trust): a member that served provably bad contributions
in `ban_after` of the last `ban_rounds` rounds is kept out of the group for `ban_rounds` rounds
after its last offence.

"Provably bad" means something the member itself served over an authenticated stream, the
same bytes for every member (the group's sha256 commitment): a blob that does not decode, a
header that lies about its peer, round or start state, or a weight above what one round can
produce. Network failures and metadata relayed by a leader never count: a hostile leader could
forge those to frame an honest member.

The offence record lives in the group state (GroupState.offences) and every member updates it
from the same evidence, so members with equal digests keep out exactly the same peers, and a
late joiner adopts the bans with the state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from swarmtune.node.config import AdmissionSettings


def record_offences(
    previous: Mapping[str, list[int]],
    offenders: Iterable[str],
    round_: int,
    settings: AdmissionSettings,
) -> dict[str, list[int]]:
    """The offence record after `round_`: this round's offenders added, rounds too old to
    matter any more (beyond a window plus a ban) dropped."""
    horizon = round_ - 2 * settings.ban_rounds
    record = {p: [r for r in rounds if r > horizon] for p, rounds in previous.items()}
    for peer in offenders:
        record[peer] = [*record.get(peer, []), round_][-settings.ban_after :]
    return {p: rounds for p, rounds in sorted(record.items()) if rounds}


def banned(
    offences: Mapping[str, list[int]], round_: int, settings: AdmissionSettings
) -> dict[str, str]:
    """peer -> why it is kept out of round `round_` (the round that starts from this state)."""
    out = {}
    for peer, rounds in offences.items():
        recent = sorted(rounds)[-settings.ban_after :]
        if len(recent) < settings.ban_after or recent[-1] - recent[0] >= settings.ban_rounds:
            continue
        until = recent[-1] + settings.ban_rounds
        if round_ <= until:
            out[peer] = (
                f"banned until round {until + 1}: {len(recent)} bad contributions"
                f" in rounds {', '.join(str(r + 1) for r in recent)}"
            )
    return out
