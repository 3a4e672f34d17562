"""The simulator: client data splits, determinism, participation, outputs, and the CLI."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from swarmtune.cli import main
from swarmtune.node.config import SimConfig
from swarmtune.node.roles.simulate import Simulation, client_texts, deal, simulate, task_mixtures

TASKS = ["arithmetic", "reverse", "capitals", "dates", "code"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _config(**overrides: object) -> SimConfig:
    base: dict = {
        "run": {"inner": {"steps": 2, "batch_size": 2, "seq_len": 16}, "outer": {"name": "ghbm"}},
        "clients": 6,
        "participation": 0.5,
        "rounds": 3,
        "texts_per_client": 20,
        "eval_batches": 1,
    }
    return SimConfig.model_validate({**base, **overrides})


def test_task_split_gives_each_client_one_task_round_robin() -> None:
    mixtures = task_mixtures(_config(clients=10), TASKS, seed=0)
    assert [next(iter(m)) for m in mixtures] == TASKS * 2
    assert all(m == {next(iter(m)): 1.0} for m in mixtures)


def test_iid_split_is_uniform() -> None:
    mixtures = task_mixtures(_config(heterogeneity={"kind": "iid"}), TASKS, seed=0)
    assert all(m == {t: 0.2 for t in TASKS} for m in mixtures)


def test_dirichlet_split_is_seeded_and_concentrates_for_small_alpha() -> None:
    sharp = _config(clients=200, heterogeneity={"kind": "dirichlet", "alpha": 0.05})
    flat = _config(clients=200, heterogeneity={"kind": "dirichlet", "alpha": 100.0})
    a, b = task_mixtures(sharp, TASKS, seed=3), task_mixtures(sharp, TASKS, seed=3)
    assert a == b and a != task_mixtures(sharp, TASKS, seed=4)
    assert all(abs(sum(m.values()) - 1) < 1e-2 for m in a)
    top_sharp = sum(max(m.values()) for m in a) / len(a)
    top_flat = sum(max(m.values()) for m in task_mixtures(flat, TASKS, seed=3)) / 200
    assert top_sharp > 0.8 and top_flat < 0.35


def _dealt(clients: int, count: int, seed: int, rounds: int = 60) -> list[list[int]]:
    rng, deck, dealt = random.Random(seed), [], []
    for _ in range(rounds):
        members, deck = deal(deck, count, clients, rng)
        dealt.append(members)
    return dealt


@pytest.mark.parametrize(("clients", "count"), [(10, 3), (20, 2), (7, 4), (5, 5), (6, 1)])
def test_balanced_sampling_deals_distinct_members_and_keeps_counts_within_one(
    clients: int, count: int
) -> None:
    joined = [0] * clients
    for members in _dealt(clients, count, seed=0):
        assert len(members) == count == len(set(members)) and set(members) <= set(range(clients))
        for c in members:
            joined[c] += 1
        assert max(joined) - min(joined) <= 1, joined  # after every round, not only at the end
    assert sum(joined) == 60 * count
    # the decks are shuffled by the seed, not dealt in one fixed order
    assert clients == count or _dealt(clients, count, seed=0) != _dealt(clients, count, seed=1)


def test_client_texts_follow_the_mixture() -> None:
    texts = client_texts({"arithmetic": 0.75, "capitals": 0.25}, 40, client_seed=1)
    assert len(texts) == 40
    capitals = [("capital" in t or "government" in t) for t in texts]
    assert sum(capitals) == 10
    # one block per task, so that training windows hold one task, as eval windows do
    assert sum(a != b for a, b in zip(capitals[:-1], capitals[1:], strict=True)) == 1


def test_same_seed_same_curve_and_c_times_k_clients_per_round() -> None:
    config = _config()
    first, second = Simulation(config, 0), Simulation(config, 0)
    rows_a, rows_b = first.run().rows, second.run().rows
    assert rows_a == rows_b and len(rows_a) == config.rounds + 1
    assert sum(c.rounds_joined for c in first.clients) == 3 * config.rounds  # C*K = 3 per round
    assert len(first.state.outer_state["history"]) == 2  # GHBM ring: tau + 1 states
    other = Simulation(config, 1).run().rows
    assert other != rows_a


def test_balanced_sampling_gives_every_client_the_same_count_of_rounds() -> None:
    sim = Simulation(_config(sampling="balanced", rounds=4), 0)  # 4 rounds of 3 out of 6
    sim.run()
    assert [c.rounds_joined for c in sim.clients] == [2] * 6


def test_simulator_uses_per_client_momentum_for_fedhbm() -> None:
    config = _config(
        run={"inner": {"steps": 2, "batch_size": 2, "seq_len": 16}, "outer": {"name": "fedhbm"}}
    )
    sim = Simulation(config, 0)
    sim.run()
    joined = [c for c in sim.clients if c.rounds_joined]
    assert all(c.momentum is not None and c.momentum.anchor_round >= 0 for c in joined)
    idle = [c for c in sim.clients if not c.rounds_joined]
    assert all(c.momentum is not None and c.momentum.anchor_round == -1 for c in idle)


def test_outputs_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compared = _config(
        rounds=2, seeds=[0, 1], compare=[{"name": "fedavg"}, {"name": "nesterov", "lr": 0.5}]
    )
    curves = simulate(compared, tmp_path / "api", "test")
    assert list(curves) == ["fedavg lr 1", "nesterov lr 0.5"]
    assert all([r.seed for r in results] == [0, 1] for results in curves.values())
    # same clients and seeds: both methods start from the same round-0 evaluation
    starts = {label: results[0].rows[0]["eval_loss"] for label, results in curves.items()}
    assert len(set(starts.values())) == 1
    csv_lines = (tmp_path / "api" / "rounds.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,seed,round,") and "loss_dates" in csv_lines[0]
    assert len(csv_lines) == 1 + 2 * 2 * 3
    assert (tmp_path / "api" / "eval_loss.png").read_bytes()[:4] == b"\x89PNG"

    config = tmp_path / "sim.yaml"
    config.write_text(
        "run: {inner: {steps: 2, batch_size: 2, seq_len: 16}, outer: {name: fedavgm}}\n"
        "clients: 4\nparticipation: 0.5\nrounds: 2\ntexts_per_client: 20\neval_batches: 1\n"
    )
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "rounds.csv" in out and "fedavgm lr 1: " not in out and "eval loss" in out
    assert (tmp_path / "cli" / "summary.json").exists()
    config.write_text("clients: 0\n")
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "bad")]) == 2
    assert "clients" in capsys.readouterr().err and not (tmp_path / "bad").exists()


GOLDEN = Path(__file__).parent / "golden" / "sim_short.json"
GOLDEN_CONFIG = {
    "run": {
        "inner": {"steps": 3, "batch_size": 2, "seq_len": 16},
        "outer": {"name": "ghbm", "tau": 2},
    },
    "clients": 4,
    "participation": 0.5,
    "rounds": 4,
    "texts_per_client": 20,
    "eval_batches": 1,
}


def test_a_short_seeded_run_matches_its_stored_losses() -> None:
    """Any numerical change to the inner loop, aggregation or outer step shows up here.

    Regenerate after an intended change with SWARMTUNE_REGEN_GOLDEN=1 (and say why in the
    commit). Tolerance: the run is deterministic on one machine; on another CPU, fp32 matmul
    kernels may sum in another order (~1e-7 relative per op), which 12 AdamW steps amplify to
    well under 1e-5 on losses of order 1; a real change moves them by far more than 1e-4.
    """
    rows = Simulation(SimConfig.model_validate(GOLDEN_CONFIG), 0).run().rows
    losses = [[row["round"], row["eval_loss"], row.get("train_loss")] for row in rows]
    if os.environ.get("SWARMTUNE_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": GOLDEN_CONFIG, "rows": losses}, indent=1))
    stored = json.loads(GOLDEN.read_text())
    assert stored["config"] == GOLDEN_CONFIG
    assert [r[0] for r in stored["rows"]] == [r[0] for r in losses]
    for (_, ev, tr), (_, ev_ref, tr_ref) in zip(losses, stored["rows"], strict=True):
        assert abs(ev - ev_ref) <= 1e-4
        assert (tr is None) == (tr_ref is None) and (tr is None or abs(tr - tr_ref) <= 1e-4)


def test_a_token_balanced_iid_split_gives_every_task_an_equal_share_of_tokens() -> None:
    from swarmtune.node.local.basemodel import ASSET_DIR, load_tokenizer
    from swarmtune.node.roles.simulate import mean_tokens, text_shares

    tokenizer = load_tokenizer(ASSET_DIR)
    lengths = mean_tokens(TASKS, tokenizer)
    assert max(lengths.values()) > 1.5 * min(lengths.values())  # texts differ: it matters
    uniform = {t: 0.2 for t in TASKS}
    shares = text_shares(uniform, lengths)
    texts = client_texts(shares, 2000, client_seed=3)
    tokens = {t: 0 for t in TASKS}
    counts = {t: 0 for t in TASKS}
    for task in TASKS:  # which task each text came from: the generators are seeded per task
        own = set(client_texts({task: 1.0}, 2000, client_seed=3))
        for text in texts:
            if text in own:
                counts[task] += 1
                tokens[task] += len(tokenizer(text)["input_ids"]) + 1
    total = sum(tokens.values())
    # a share of 2000 texts sampled from each task: a few percent from sampling noise
    assert all(abs(tokens[t] / total - 0.2) < 0.03 for t in TASKS), tokens
    by_count = {t: counts[t] / sum(counts.values()) for t in TASKS}
    assert max(by_count.values()) - min(by_count.values()) > 0.1  # unlike an equal text split
    config = _config(heterogeneity={"kind": "iid", "balance": "tokens"}, clients=2, rounds=1)
    assert Simulation(config, 0).clients[0].mixture == uniform  # reported as token shares
