"""The simulator's clock: the seconds and bytes of rounds of a swarm larger than this machine.

Every volunteer gets a profile, drawn once per seed (docs/design.md, "The simulator's clock",
says where the distributions come from): seconds per inner step, upload and download bandwidth,
round-trip time. A round of the members present, as the daemon runs it (one group of every
live volunteer, an all-gather of contributions of S bytes; hivemind's leader, the first member
to look for a group, closes it once every expected member is in or its matchmaking window W
runs out, whichever comes first):

    arrive_i = H * step_i + rtt_i
    close    = min(max_i arrive_i, min_i arrive_i + W), or min_i arrive_i + W when an expected
               member left since the last round (a no-show: waited for once, then not again,
               node/engine/swarm_transport.py)
    in       = the members with arrive_i <= close (the later ones miss the group: their round
               is lost, as a real member's is when its group finished without it)
    fetch_i  = rtt_i + max((g-1) S / down_i, max_{j != i} (g-1) S / up_j)   over the g in
               every member fetches g-1 blobs through its own downlink, and each provider's
               uplink is shared by the g-1 members fetching from it
    round    = close + max_i fetch_i             the slowest member sets when the next closes
    bytes    = 2 (g-1) S per member              g-1 blobs served, g-1 fetched

Churn: each round a live volunteer is gone with chance `churn`, and a gone one is back with
chance `back`; gone volunteers take no part, and a round after any volunteer left closes on
the window (every live volunteer of the run is expected, sampled or not).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from swarmtune.node.config import ClockSettings


@dataclass(frozen=True)
class Profile:
    """One volunteer's hardware and link."""

    step_s: float  # seconds per inner step
    up: float  # bytes per second
    down: float
    rtt_s: float


@dataclass(frozen=True)
class RoundTime:
    """What the clock says one round took."""

    members: int  # in the group
    compute_s: float  # until the last member that got in arrived
    waited_s: float  # after that, until the group closed (a no-show, or a member too late)
    exchange_s: float  # the slowest member's fetches
    bytes_per_member: int  # sent plus received
    missed: int = 0  # members that arrived after the group closed
    admitted: tuple[int, ...] = ()  # positions (in the members given) of those that got in

    @property
    def wall_s(self) -> float:
        return self.compute_s + self.waited_s + self.exchange_s


def draw_profiles(n: int, settings: ClockSettings, seed: int) -> list[Profile]:
    """n profiles: step times log-uniform in [1, speed_spread] x step_s, links log-normal
    around the medians (independent up and down), round trips log-uniform in rtt_ms."""
    rng = random.Random(f"clock:{seed}")
    low, high = (v / 1000 for v in settings.rtt_ms)
    profiles = []
    for _ in range(n):
        step = settings.step_s * settings.speed_spread ** rng.random()
        up = settings.up_mbps * 1e6 / 8 * math.exp(settings.link_sigma * rng.gauss(0.0, 1.0))
        down = settings.down_mbps * 1e6 / 8 * math.exp(settings.link_sigma * rng.gauss(0.0, 1.0))
        rtt = low * (high / low) ** rng.random() if low > 0 else high * rng.random()
        profiles.append(Profile(step, up, down, rtt))
    return profiles


def admitted(
    members: Sequence[Profile], steps: int, window_s: float, no_show: bool
) -> tuple[list[int], float]:
    """Indices of the members that get into the group, and when it closes (seconds from the
    round's start)."""
    arrive = [steps * m.step_s + m.rtt_s for m in members]
    first = min(arrive)
    close = first + window_s if no_show else min(max(arrive), first + window_s)
    return [i for i, a in enumerate(arrive) if a <= close], close


def round_time(
    members: Sequence[Profile], steps: int, blob_bytes: int, window_s: float, no_show: bool
) -> RoundTime:
    """The formula of the module docstring for the members present (a lone member waits out
    its window and exchanges nothing)."""
    if not members:
        return RoundTime(0, 0.0, window_s, 0.0, 0)
    inside, close = admitted(members, steps, window_s, no_show)
    got_in = [members[i] for i in inside]
    last = max(steps * m.step_s + m.rtt_s for m in got_in)
    missed = len(members) - len(got_in)
    g = len(got_in)
    if g < 2:
        return RoundTime(1, last, window_s, 0.0, 0, missed, tuple(inside))
    load = (g - 1) * blob_bytes
    serve = [load / m.up for m in got_in]  # each provider's uplink, shared by g-1 fetchers
    order = sorted(range(g), key=lambda i: serve[i])
    slowest, second = order[-1], order[-2]
    fetches = [
        # the slowest provider other than this member (its own uplink is not on its path)
        m.rtt_s + max(load / m.down, serve[second if i == slowest else slowest])
        for i, m in enumerate(got_in)
    ]
    return RoundTime(g, last, close - last, max(fetches), 2 * load, missed, tuple(inside))


class Clock:
    """Profiles, churn and the running total of one simulation."""

    def __init__(self, n: int, settings: ClockSettings, window_s: float, seed: int) -> None:
        self.settings = settings
        self.window_s = window_s
        self.profiles = draw_profiles(n, settings, seed)
        self.gone: set[int] = set()
        self.rng = random.Random(f"churn:{seed}")
        self.no_show = False  # someone left this round: its group waits one window
        self.elapsed = 0.0

    def churn(self) -> None:
        """Who leaves and who comes back before this round."""
        left = False
        for c in range(len(self.profiles)):
            if c in self.gone:
                if self.rng.random() < self.settings.back:
                    self.gone.discard(c)
            elif self.settings.churn > 0 and self.rng.random() < self.settings.churn:
                self.gone.add(c)
                left = True
        self.no_show = left

    def present(self, sampled: Sequence[int]) -> list[int]:
        """The sampled clients that are live this round."""
        return [c for c in sampled if c not in self.gone]

    def advance(self, members: Sequence[int], steps: int, blob_bytes: int) -> RoundTime:
        """The round of the live `members` (those that get in, `admitted`, and those too
        late); adds it to the running total."""
        spent = round_time(
            [self.profiles[c] for c in members], steps, blob_bytes, self.window_s, self.no_show
        )
        self.elapsed += spent.wall_s
        return spent
