"""`swarmtune simulate`: K virtual clients with partial participation, on the daemon's round code.

Each round samples round(C*K) clients without replacement: uniformly, or (`sampling: balanced`)
dealt from shuffled decks of all K, so that participations stay within one of each other. Every
sampled client runs node.engine.round.inner_phase (the daemon's inner loop, GHBM hooks and
per-peer momentum included) on its own data. The exchange is the in-memory transport's
all-gather (InMemoryHub.gathered); from there on the round is node.engine.round.conclude_round,
the function the daemon uses after its exchange (selection, fallback, outer step, report). A
peer's sync, certificates and checkpoints are not simulated: every sampled client starts from
the one current state. One shared LoRA model is reused: a client is its data stream, its
per-peer momentum and (optionally) its AdamW moments, swapped in when sampled.

With `averaging.overlap`, a client that took part in the previous round computes as an
overlapped daemon peer does (Peer.advance, node/engine/peer.py): from the eager point of the
state before the previous round and its own previous Delta, with that state's GHBM correction.
A client that sat the previous round out starts from the current state, like a peer that
(re)joins.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarmtune.aggregation.ghbm import PeerMomentum
from swarmtune.aggregation.methods import make_peer_momentum
from swarmtune.aggregation.params import Params
from swarmtune.node.config import SimConfig
from swarmtune.node.engine.round import (
    LocalUpdate,
    RoundReport,
    RoundStart,
    conclude_round,
    eager_origin,
    inner_phase,
    restamp,
    round_start,
)
from swarmtune.node.engine.state import GroupState
from swarmtune.node.engine.transport import AveragingFailed, GroupResult, InMemoryHub
from swarmtune.node.local.basemodel import load_base, resolve_target_modules
from swarmtune.node.local.data import (
    BUILTIN_TASKS,
    TokenBatcher,
    builtin_eval_texts,
    builtin_texts,
    eval_batches,
)
from swarmtune.node.local.trainer import InnerTrainer, attach_lora
from swarmtune.node.roles.clock import Clock
from swarmtune.protocols.group import MemberMeta

log = logging.getLogger("swarmtune.simulate")


@dataclass
class Client:
    """One virtual volunteer: its task mixture, data stream and private state."""

    name: str
    mixture: dict[str, float]
    batches: TokenBatcher
    momentum: PeerMomentum | None
    inner_state: dict[str, Any] | None = None
    rounds_joined: int = 0
    last: tuple[int, Params] | None = None  # (round of its start state, Delta) it last sent


@dataclass
class SimResult:
    """Per-round rows (round, eval losses per task and their mean) for one seed."""

    seed: int
    rows: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)  # averaged / no-group / rejected


def task_mixtures(config: SimConfig, tasks: list[str], seed: int) -> list[dict[str, float]]:
    """Each client's task proportions: one task (round robin), Dirichlet(alpha), or uniform."""
    het = config.heterogeneity
    if het.kind == "task":
        return [{tasks[c % len(tasks)]: 1.0} for c in range(config.clients)]
    if het.kind == "iid":
        return [{t: 1.0 / len(tasks) for t in tasks} for _ in range(config.clients)]
    rng = random.Random(f"dirichlet:{seed}")
    mixtures = []
    for _ in range(config.clients):
        draws = [rng.gammavariate(het.alpha, 1.0) for _ in tasks]  # normalised: Dirichlet(alpha)
        total = sum(draws) or 1.0
        mixtures.append(
            {t: d / total for t, d in zip(tasks, draws, strict=True) if d / total > 1e-3}
        )
    return mixtures


def text_shares(mixture: dict[str, float], tokens_per_text: dict[str, float]) -> dict[str, float]:
    """The text shares that make `mixture` the tasks' shares of tokens: a task whose texts are
    twice as long gets half the texts per unit of weight."""
    scaled = {t: w / tokens_per_text[t] for t, w in mixture.items()}
    total = sum(scaled.values())
    return {t: v / total for t, v in scaled.items()}


def mean_tokens(tasks: list[str], tokenizer: Any, sample: int = 64) -> dict[str, float]:
    """Mean token count of a built-in task's texts (EOS included, as in the stream)."""
    return {
        t: 1.0 + sum(len(tokenizer(x)["input_ids"]) for x in builtin_texts(t, sample, 7)) / sample
        for t in tasks
    }


def client_texts(mixture: dict[str, float], n: int, client_seed: int) -> list[str]:
    """n built-in texts split across tasks by the mixture (at least one text per listed task),
    one block per task. Not shuffled together: training draws random windows from the joined
    stream, and with mixed texts most windows would mix tasks, unlike every eval window (one
    task each) and unlike a one-task client's windows. Shuffled together, the IID split ended at
    1.1521 instead of 1.0599 (bench/split_probe.py --rounds 67)."""
    texts: list[str] = []
    order = random.Random(client_seed)  # shuffles within each block
    for task, weight in sorted(mixture.items()):
        block = builtin_texts(task, max(1, round(weight * n)), seed=client_seed)
        order.shuffle(block)
        texts += block
    return texts


def deal(
    deck: list[int], count: int, clients: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """Balanced sampling: the next `count` clients of `deck`, a shuffled pass over all clients,
    and what is left of it. When the deck runs short, its rest is topped up with the first
    distinct clients of a fresh shuffle, which leave the new deck: every pass deals every
    client once, so participations never differ by more than one."""
    members, rest = deck[:count], deck[count:]
    if len(members) < count:
        fresh = list(range(clients))
        rng.shuffle(fresh)
        extra = [c for c in fresh if c not in members][: count - len(members)]
        members, rest = members + extra, [c for c in fresh if c not in extra]
    return members, rest


class Simulation:
    """One seed of one simulator config: clients, shared model, eval sets, the round loop."""

    def __init__(self, config: SimConfig, seed: int) -> None:
        self.config, self.seed = config, seed
        run = config.run
        self.tasks = list(config.tasks or BUILTIN_TASKS)
        base, tokenizer, _ = load_base(None if run.base_model == "embedded" else run.base_model)
        targets = resolve_target_modules(run, base)
        model = attach_lora(base, run.lora, targets, seed=run.seed)
        inner = run.inner
        mixtures = task_mixtures(config, self.tasks, seed)
        shares = mixtures  # of texts; with balance "tokens" the mixtures are shares of tokens
        if config.heterogeneity.balance == "tokens":
            lengths = mean_tokens(self.tasks, tokenizer)
            shares = [text_shares(m, lengths) for m in mixtures]
        self.clients = [
            Client(
                f"c{c}",
                mixture,
                TokenBatcher(
                    client_texts(shares[c], config.texts_per_client, seed * 100_003 + c),
                    tokenizer,
                    inner.seq_len,
                    inner.batch_size,
                    seed * 100_003 + c,
                ),
                make_peer_momentum(run.outer.name, run.outer.effective_momentum, run.outer.tau),
            )
            for c, mixture in enumerate(mixtures)
        ]
        self.trainer = InnerTrainer(model, inner, self.clients[0].batches)
        self.eval_sets = {
            t: eval_batches(builtin_eval_texts(t), tokenizer, inner.seq_len, 8, config.eval_batches)
            for t in self.tasks
        }
        self.sampler = random.Random(f"sample:{seed}")
        self.deck: list[int] = []  # balanced sampling: clients still to be dealt this pass
        self.observers: dict[str, Callable[[Params, Params], None]] = {}  # by client name
        self.state = GroupState(0, self.trainer.get_params(), {})
        self.outcomes: Counter[str] = Counter()  # round outcomes, as the daemon reports them
        self.reports: list[RoundReport] = []  # seen from each round's first member
        self.previous: GroupState | None = None  # the state the last round started from
        self.previous_start: RoundStart | None = None
        self.hub = InMemoryHub(expected=len(self.clients))  # the in-memory transport's exchange
        self.clock: Clock | None = None  # seconds and bytes per round (node/roles/clock.py)
        self.blob_bytes = 0
        if config.clock is not None:
            window = run.averaging.matchmaking_time
            self.clock = Clock(len(self.clients), config.clock, window, seed)
            self.blob_bytes = config.clock.blob_bytes or self.contribution_size()

    def contribution_size(self) -> int:
        """Bytes of one encoded contribution of this model in the run's codec."""
        from swarmtune.protocols.averaging import encode_contribution  # (loads hivemind)

        zeros = {k: torch.zeros_like(v) for k, v in self.state.params.items()}
        meta = MemberMeta("c0", 0, self.state.digest(), 1.0)
        return len(encode_contribution(zeros, meta, self.config.run.averaging.codec))

    def evaluate(self) -> dict[str, float]:
        """Eval loss of the current global adapter on every task, and their mean."""
        self.trainer.set_params(self.state.params)
        losses = {f"loss_{t}": self.trainer.eval_loss(b) for t, b in self.eval_sets.items()}
        return {**losses, "eval_loss": sum(losses.values()) / len(losses)}

    def client_update(
        self,
        client: Client,
        start: RoundStart,
        state: GroupState | None = None,
        origin: Params | None = None,
    ) -> LocalUpdate:
        """The daemon's inner phase for one client, with its own data and private state (from
        `state`, default the current one, and from `origin` if given)."""
        self.trainer.switch_data(client.batches, client.inner_state)
        update = inner_phase(
            self.state if state is None else state,
            start,
            self.trainer,
            client.name,
            self.config.run,
            client.momentum,
            known=len(self.clients),
            observe=self.observers.get(client.name),
            origin=origin,
        )
        if self.config.keep_inner_state:
            client.inner_state = self.trainer.optimizer.state_dict()
        client.rounds_joined += 1
        return update

    def overlapped_update(self, client: Client, previous: GroupState) -> LocalUpdate:
        """What an overlapped peer sends this round: computed during the previous round's
        exchange, from the eager point of `previous` and its own last Delta."""
        assert client.last is not None
        origin = eager_origin(previous, client.last[1], self.config.run)
        if self.previous_start is None:
            self.previous_start = round_start(previous, self.config.run)
        update = self.client_update(client, self.previous_start, previous, origin)
        return restamp(update, self.state)

    def step(self) -> dict[str, float]:
        """One round: sample round(C*K) clients, then a group round with those present (all of
        them without a clock; with one, those its churn left in and that reach the group before
        it closes: a real member that comes too late computes for nothing and resyncs, here it
        does not compute)."""
        count = max(1, round(self.config.participation * len(self.clients)))
        if self.config.sampling == "uniform":
            members = sorted(self.sampler.sample(range(len(self.clients)), count))
        else:
            dealt, self.deck = deal(self.deck, count, len(self.clients), self.sampler)
            members = sorted(dealt)
        if self.clock is None:
            return self.group_round(members)
        self.clock.churn()
        live = self.clock.present(members)
        spent = self.clock.advance(live, self.config.run.inner.steps, self.blob_bytes)
        inside = [live[i] for i in spent.admitted]  # the others arrive after the group closed
        if inside:
            row = self.group_round(inside)
        else:  # everyone sampled is gone: a window passes, nothing is trained
            self.outcomes["nobody"] += 1
            row = {"round": self.state.round, "train_loss": math.nan}
        row.update(
            members=spent.members,
            missed=spent.missed,
            compute_s=spent.compute_s,
            waited_s=spent.waited_s,
            exchange_s=spent.exchange_s,
            round_s=spent.wall_s,
            wall_s=self.clock.elapsed,
            bytes_per_member=spent.bytes_per_member,
        )
        return row

    def group_round(self, members: list[int]) -> dict[str, float]:
        """Inner phases of `members` from self.state, all-gathered in process, then the daemon's
        conclude_round (seen from the first member; every member computes the same aggregate)."""
        start = round_start(self.state, self.config.run)
        previous, overlap = self.previous, self.config.run.averaging.overlap
        self.previous_start = None
        updates = []
        for c in members:
            client = self.clients[c]
            last = client.last
            if overlap and previous is not None and last is not None and last[0] == previous.round:
                updates.append(self.overlapped_update(client, previous))
            else:
                updates.append(self.client_update(client, start))
            client.last = (self.state.round, updates[-1].delta)
        self.previous = self.state
        answer = self.gather(updates)
        self.state, report = conclude_round(self.state, updates[0], answer, self.config.run)
        self.reports.append(report)
        self.outcomes[report.outcome] += 1
        train_loss = sum(u.inner.loss_mean for u in updates) / len(updates)
        row: dict[str, float] = {"round": self.state.round, "train_loss": train_loss}
        if report.tau is not None:
            row["tau"] = report.tau
        return row

    def gather(self, updates: list[LocalUpdate]) -> GroupResult | AveragingFailed:
        """The in-memory transport's all-gather of the members' updates, seen from the first
        (`hub` injects lost contributions; bench/attacks.py overrides this to put hostile
        members in the group)."""
        if len(updates) < 2:
            return AveragingFailed("a single client was sampled")
        return self.hub.gathered([(u.delta, u.meta) for u in updates], updates[0].meta.peer)

    def run(self, progress: Callable[[str], None] | None = None) -> SimResult:
        """All rounds; eval every `eval_every` rounds and after the last."""
        result = SimResult(self.seed)
        started = time.perf_counter()
        result.rows.append({"round": 0, **self.evaluate()})
        for r in range(1, self.config.rounds + 1):
            row = self.step()
            if r % self.config.eval_every == 0 or r == self.config.rounds:
                row.update(self.evaluate())
                result.rows.append(row)
                if progress is not None:
                    elapsed = time.perf_counter() - started
                    eta = elapsed / r * (self.config.rounds - r)
                    clock = f", simulated {row['wall_s']:.0f}s" if "wall_s" in row else ""
                    progress(
                        f"seed {self.seed} round {r}/{self.config.rounds}: eval"
                        f" {row['eval_loss']:.4f} train {row['train_loss']:.4f}"
                        f" ({elapsed:.0f}s{clock}, ~{eta:.0f}s left)"
                    )
        result.seconds = time.perf_counter() - started
        result.outcomes = dict(self.outcomes)
        return result


def write_outputs(curves: dict[str, list[SimResult]], out: Path, title: str) -> list[Path]:
    """rounds.csv (every method's and seed's rows), summary.json, and eval_loss.png (one curve
    per method); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"method": label, "seed": r.seed, **row}
        for label, results in curves.items()
        for r in results
        for row in r.rows
    ]
    first = ("method", "seed", "round")
    columns = sorted(
        {k for row in rows for k in row},
        key=lambda k: (k not in first, first.index(k) if k in first else 0, k),
    )
    csv_path = out / "rounds.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "title": title,
        "methods": {
            label: {
                "seeds": [r.seed for r in results],
                "final_eval_loss": [r.rows[-1]["eval_loss"] for r in results],
                "seconds": [round(r.seconds, 1) for r in results],
                "outcomes": {str(r.seed): r.outcomes for r in results},
                "rows": {str(r.seed): r.rows for r in results},
            }
            for label, results in curves.items()
        },
    }
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=1, allow_nan=True))
    png_path = out / "eval_loss.png"
    plot_curves(curves, png_path)
    return [csv_path, json_path, png_path]


def plot_curves(curves: dict[str, list[SimResult]], path: Path, ylabel: str = "eval loss") -> None:
    """Mean (line) and min-max over seeds (band) of eval loss per round, one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, results in curves.items():
        rounds = [row["round"] for row in results[0].rows]
        series = [[row["eval_loss"] for row in r.rows] for r in results]
        mean = [sum(v) / len(v) for v in zip(*series, strict=True)]
        ax.plot(rounds, mean, label=label)
        if len(series) > 1:
            lows = [min(v) for v in zip(*series, strict=True)]
            highs = [max(v) for v in zip(*series, strict=True)]
            ax.fill_between(rounds, lows, highs, alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(curves: dict[str, list[SimResult]]) -> list[str]:
    """One line per method: eval loss at the start and at the end (mean over seeds)."""
    lines = []
    for label, results in curves.items():
        start = sum(r.rows[0]["eval_loss"] for r in results) / len(results)
        end = sum(r.rows[-1]["eval_loss"] for r in results) / len(results)
        rounds = int(results[0].rows[-1]["round"])
        lines.append(f"{label:<28} eval loss {start:.4f} -> {end:.4f} after {rounds} rounds")
    return lines


def simulate(
    config: SimConfig, out: Path, title: str, progress: Callable[[str], None] | None = None
) -> dict[str, list[SimResult]]:
    """Run every method (config.compare, or run.outer) on every seed, write outputs, return
    the results by method label."""
    curves: dict[str, list[SimResult]] = {}
    for label, variant in config.variants().items():
        tell = (lambda line, label=label: progress(f"{label}: {line}")) if progress else None
        curves[label] = [Simulation(variant, seed).run(tell) for seed in variant.seeds]
    write_outputs(curves, out, title)
    return curves
