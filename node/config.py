"""Run configuration: pydantic v2 models loaded from YAML; one clear line on bad input."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarmtune.aggregation.merge import MERGE_METHODS
from swarmtune.aggregation.methods import OUTER_METHODS, OuterMethod


class ConfigError(ValueError):
    """A bad config file or value; the message is one line meant for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_M = TypeVar("_M", bound=BaseModel)


class LoraSettings(_Strict):
    """LoRA adapter shape; target_modules 'auto' is resolved by the coordinator from its base."""

    rank: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1, le=4096)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["auto"] = "auto"
    # FFA-LoRA (arXiv 2403.12313): A stays at its seeded initial value on every peer and only B
    # trains, so averaging B averages the updates exactly (mean(B) A = mean(B A)), at half the bytes
    freeze_a: bool = False


class InnerSettings(_Strict):
    """Local AdamW steps between outer steps (DiLoCo H); plain SGD as a study control."""

    steps: int = Field(20, ge=1, le=100_000)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(8, ge=1, le=4096)
    seq_len: int = Field(64, ge=8, le=8192)
    max_grad_norm: float = Field(1.0, gt=0)
    # batches whose gradients add up to one step (an effective batch of batch_size x this)
    grad_accum: int = Field(1, ge=1, le=1024)
    # recompute activations in the backward pass: less memory, about a third more compute
    gradient_checkpointing: bool = False
    # the round's deadline: a member stops its inner steps once this many seconds of them have
    # passed (after at least one), short of `steps` if it is slow, and contributes what it
    # trained; contributions are rescaled by their step counts (aggregation/steps.py), so a
    # slow member still counts as one member. `auto`: no deadline in a peer's first round, then
    # H x the median of its last group's seconds per step (aggregation/steps.py). null: always
    # `steps` steps (docs/design.md, 3)
    deadline_s: Annotated[float, Field(gt=0, le=86_400)] | Literal["auto"] | None = None

    def fixed_deadline(self) -> float | None:
        """The deadline in seconds when the config names one (not `auto`, not null)."""
        return self.deadline_s if isinstance(self.deadline_s, float) else None


def _registered(name: str, table: Mapping[str, object], what: str) -> str:
    """`name` if `table` (a registry of aggregation/) has it, else the error listing its names."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(table)}")
    return name


class OuterSettings(_Strict):
    """Outer optimizer applied to the averaged pseudo-gradient (aggregation/methods.py names
    each, with its defaults; outer.py and ghbm.py hold the math)."""

    # the outer-optimizer study (bench/RESULTS.md, "Outer-optimizer study"): with one task per
    # volunteer, partial participation and AdamW inner steps, plain averaging did best;
    # momentum paid off only with plain-SGD inner steps. The README says when to pick which
    name: str = "fedavg"  # a name of aggregation/methods.py's OUTER_METHODS
    lr: float | None = Field(None, gt=0, le=10)
    momentum: float | None = Field(None, ge=0, le=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    eps: float = Field(1e-3, gt=0, le=1)
    # Unset: "auto" for local-ghbm / fedhbm (see _per_peer_tau_is_auto), 1 for ghbm / ghbm-server.
    tau: Annotated[int, Field(ge=1, le=1000)] | Literal["auto"] = 1
    tau_max: int = Field(20, ge=1, le=1000)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return _registered(name, OUTER_METHODS, "outer optimizer")

    @model_validator(mode="before")
    @classmethod
    def _per_peer_tau_is_auto(cls, data: object) -> object:
        """Per-peer methods (local-ghbm, fedhbm) without a tau get "auto": the rounds since the
        peer last took part, ~1/C as in the GHBM paper (tau 1 would count all that displacement
        as one round's)."""
        method = OUTER_METHODS.get(data.get("name", "")) if isinstance(data, dict) else None
        if isinstance(data, dict) and method is not None and method.per_peer:
            return {"tau": "auto", **data}
        return data

    @property
    def method(self) -> OuterMethod:
        """The descriptor of the configured optimizer."""
        return OUTER_METHODS[self.name]

    @property
    def effective_lr(self) -> float:
        """The configured outer lr, or the method's default."""
        return self.lr if self.lr is not None else self.method.lr

    @property
    def effective_momentum(self) -> float:
        """The configured momentum / GHBM beta, or the method's default."""
        if self.momentum is not None:
            return self.momentum
        return self.method.momentum

    def label(self) -> str:
        """A short name for plots and tables, e.g. `nesterov lr 0.7` or `ghbm lr 1 tau 3`."""
        text = f"{self.name} lr {self.effective_lr:g}"
        return text + (f" tau {self.tau}" if "tau" in self.method.params else "")

    def hyperparameters(self) -> dict[str, float | int | str]:
        """Keyword arguments for aggregation.methods.make_outer: the ones the method takes."""
        mu = self.effective_momentum
        values = {"lr": self.effective_lr, "momentum": mu, "beta": mu, "beta1": self.beta1,
                  "beta2": self.beta2, "eps": self.eps, "tau": self.tau, "tau_max": self.tau_max}  # fmt: skip
        return {name: values[name] for name in self.method.params}

    @model_validator(mode="after")
    def _momentum_below_one(self) -> OuterSettings:
        if self.method.heavy_ball and self.effective_momentum >= 1:
            raise ValueError(f"momentum must be < 1 for {self.name}")
        return self


class AveragingSettings(_Strict):
    """How a group forms and how its contributions are combined (docs/design.md, 3-4)."""

    matchmaking_time: float = Field(5.0, gt=0, le=600)
    allreduce_timeout: float = Field(60.0, gt=0, le=3600)  # fetching the contributions
    # members a group needs to average: matchmaking waits for that many, and a group left with
    # fewer usable contributions applies no update at all ("too-small"). A group of 2 has no
    # majority, so one stranger in it holds half: public runs should use 3 (docs/design.md, 8)
    min_group_size: int = Field(2, ge=2, le=1024)
    # contributions on the wire: fp32, fp16, or int8 with an fp32 absmax per 64 values
    codec: Literal["fp32", "fp16", "int8"] = "fp32"
    # a member's weight in the aggregate: `steps`, the inner steps it trained this round (equal
    # work, equal say), or `tokens`, the tokens in its loss. With AdamW inner steps a member's
    # Delta_i is about as long after H steps whatever its batches held, so token weights hand a
    # task with long answers most of the shared adapter (bench/RESULTS.md, "Real fine-tuning")
    weight: Literal["steps", "tokens"] = "steps"
    # centered-clip: bounded influence (aggregation/robust.py); mean: the weighted mean
    aggregator: Literal["mean", "centered-clip"] = "centered-clip"
    clip_scale: float = Field(2.0, gt=0, le=1000)  # tau = clip_scale x median distance
    clip_iterations: int = Field(3, ge=1, le=100)
    # contributions longer than norm_bound x the median norm are scaled down first; null: off
    norm_bound: float | None = Field(1.0, gt=0, le=1000)
    # compute the next round while this one's exchange is in flight (docs/design.md,
    # "Overlapped rounds"); a volunteer may override it with `join --overlap on|off`
    overlap: bool = False
    # blobs of 1 MiB and up over a plain TCP connection between peers that dial each other
    # directly, sha256-checked but not encrypted (docs/design.md, "Direct transfers"): for LANs
    direct_tcp: bool = False


class AdmissionSettings(_Strict):
    """Who may average (docs/design.md, 8. Trust): `open` admits any peer, `token` only holders
    of a coordinator-signed ticket (`swarmtune admit`), `address` hands such tickets out on
    request, a limited number per IPv4 address (Sybils then cost addresses). In all, a member
    that served bad contributions in `ban_after` of `ban_rounds` rounds is kept out for
    `ban_rounds` rounds."""

    @property
    def ticketed(self) -> bool:
        """True when members need a coordinator-signed ticket (token and address runs)."""
        return self.policy != "open"

    policy: Literal["open", "token", "address"] = "open"
    ticket_hours: float = Field(168.0, gt=0, le=24 * 366)  # default lifetime of a new ticket
    # `address`: the coordinator hands a ticket to any peer that asks, while the IPv4 address
    # its connection comes from holds fewer than this many identities (protocols/ticket_desk.py)
    identities_per_address: int = Field(1, ge=1, le=4096)
    ban_after: int = Field(3, ge=1, le=64)
    ban_rounds: int = Field(10, ge=1, le=100_000)


class ClusteringSettings(_Strict):
    """Similarity-clustered groups (docs/design.md, 6. Clusters): who averages with whom, and level-2 merges."""

    enabled: bool = False
    warmup_rounds: int = Field(2, ge=1, le=10_000)
    reevaluate_every: int = Field(5, ge=1, le=100_000)
    clusters: Annotated[int, Field(ge=1, le=1000)] | Literal["auto"] = "auto"
    sketch_k: int = Field(6, ge=2, le=32)
    merge_every: int = Field(2, ge=1, le=100_000)
    merge_method: str = "linear"  # a name of aggregation/merge.py's MERGE_METHODS
    merge_rank: int | None = Field(None, ge=1, le=4096)
    # a cluster smaller than this joins its most similar cluster (2+: no cluster of one, whose
    # rounds nobody can vouch for; it does not stop a copied task signature: README, Security)
    min_cluster_size: int = Field(1, ge=1, le=1000)

    @field_validator("merge_method")
    @classmethod
    def _known_merge(cls, name: str) -> str:
        return _registered(name, MERGE_METHODS, "merge method")


def max_round_weight(config: RunConfig) -> float:
    """The largest weight one member can claim for one round: H steps (`averaging.weight:
    steps`), or the tokens of H steps of full batches, each step grad_accum of them (`tokens`)."""
    inner = config.inner
    if config.averaging.weight == "steps":
        return float(inner.steps)
    return float(inner.steps * inner.grad_accum * inner.batch_size * inner.seq_len)


class RunConfig(_Strict):
    """Everything the coordinator publishes in the manifest (per-machine things are CLI flags)."""

    run_id: str = Field("swarmtune-demo", pattern=r"^[a-z0-9][a-z0-9-]{2,63}$")
    # "embedded", a local model dir, or a Hugging Face hub id (org/name; node/local/basemodel.py)
    base_model: str = "embedded"
    seed: int = Field(0, ge=0)
    lora: LoraSettings = LoraSettings()
    inner: InnerSettings = InnerSettings()
    outer: OuterSettings = OuterSettings()
    averaging: AveragingSettings = AveragingSettings()
    admission: AdmissionSettings = AdmissionSettings()
    clustering: ClusteringSettings = ClusteringSettings()

    @model_validator(mode="after")
    def _settings_agree(self) -> RunConfig:
        if self.clustering.enabled and self.lora.freeze_a:
            raise ValueError("lora.freeze_a cannot be combined with clustering yet")
        if self.inner.deadline_s is not None and self.averaging.weight != "steps":
            raise ValueError(
                "inner.deadline_s needs averaging.weight: steps (contributions are rescaled by"
                " their step counts)"
            )
        return self


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    parts = [str(p) for p in err["loc"] if isinstance(p, int) or str(p).isidentifier()]
    where = ".".join(parts) or "config"
    return f"{where}: {err['msg']}"


def _validate(model: type[_M], data: object, source: str) -> _M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None


def parse_config(data: object, source: str = "config") -> RunConfig:
    """Validate a mapping into a RunConfig, raising ConfigError with one line."""
    return _validate(RunConfig, data, source)


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None


def load_config(path: str | Path) -> RunConfig:
    """Load and validate a YAML run config."""
    path = Path(path)
    return parse_config(_read_yaml(path), str(path))


class HeterogeneitySettings(_Strict):
    """How tasks are spread over simulated clients: one task each, Dirichlet(alpha) mixtures, IID."""

    kind: Literal["task", "dirichlet", "iid"] = "task"
    alpha: float = Field(0.5, gt=0, le=1000)
    # a client's mixture weights are shares of its texts, or of its tokens (tasks' texts differ
    # in length, so equal text counts are not an equal share of the training stream)
    balance: Literal["texts", "tokens"] = "texts"


class ClockSettings(_Strict):
    """The simulator's clock (node/roles/clock.py): what each volunteer's hardware and link are
    drawn from. Defaults and where they come from: docs/design.md, "The simulator's clock"."""

    step_s: float = Field(0.1, gt=0, le=3600)  # the fastest volunteer's seconds per inner step
    speed_spread: float = Field(10.0, ge=1, le=1000)  # step times log-uniform in [1, spread] x
    up_mbps: float = Field(44.0, gt=0, le=1e6)  # median upload, megabits per second
    down_mbps: float = Field(84.0, gt=0, le=1e6)  # median download
    link_sigma: float = Field(0.8, ge=0, le=5)  # log-normal spread of both, around the medians
    rtt_ms: tuple[float, float] = (20.0, 200.0)  # round-trip times log-uniform in this range
    churn: float = Field(0.0, ge=0, lt=1)  # chance a live volunteer is gone in a round
    back: float = Field(0.5, gt=0, le=1)  # chance a gone volunteer is back the next round
    blob_bytes: int | None = Field(None, ge=1)  # default: the encoded size of a real contribution

    @model_validator(mode="after")
    def _rtt_range(self) -> ClockSettings:
        low, high = self.rtt_ms
        if not 0 <= low <= high:
            raise ValueError(f"rtt_ms must be [low, high] with 0 <= low <= high, got {self.rtt_ms}")
        return self


class SimConfig(_Strict):
    """`swarmtune simulate`: K virtual clients on the daemon's round code, one after another."""

    run: RunConfig = RunConfig()
    clients: int = Field(100, ge=1, le=10_000)
    participation: float = Field(0.1, gt=0, le=1)
    # who takes part in a round: `uniform` draws round(C*K) clients afresh every round;
    # `balanced` deals them from shuffled decks of all K, so after R rounds every client has
    # taken part floor or ceil of R*C times (a study can then promise each client a count)
    sampling: Literal["uniform", "balanced"] = "uniform"
    heterogeneity: HeterogeneitySettings = HeterogeneitySettings()
    tasks: list[str] = Field(default_factory=list, max_length=64)
    rounds: int = Field(30, ge=1, le=100_000)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=100)
    texts_per_client: int = Field(200, ge=10, le=100_000)
    eval_every: int = Field(1, ge=1)
    eval_batches: int = Field(2, ge=1, le=1000)
    keep_inner_state: bool = False
    # outer optimizers to run side by side on the same clients and seeds (default: run.outer)
    compare: list[OuterSettings] = Field(default_factory=list, max_length=16)
    # a simulated wall clock and byte count per round (None: rounds only)
    clock: ClockSettings | None = None

    @model_validator(mode="after")
    def _no_deadline(self) -> SimConfig:
        # clients train one after another on one machine: a wall-clock deadline would make a
        # study's numbers depend on the machine's speed
        if self.run.inner.deadline_s is not None:
            raise ValueError("run.inner.deadline_s: the simulator trains H steps per client")
        return self

    def variants(self) -> dict[str, SimConfig]:
        """label -> this config with one outer optimizer (just itself when compare is empty)."""
        if not self.compare:
            return {self.run.outer.label(): self}
        return {
            outer.label(): self.model_copy(
                update={"run": self.run.model_copy(update={"outer": outer}), "compare": []}
            )
            for outer in self.compare
        }


def load_sim_config(path: str | Path) -> SimConfig:
    """Load and validate a simulator YAML (one clear line on bad input)."""
    return _validate(SimConfig, _read_yaml(Path(path)), str(path))
