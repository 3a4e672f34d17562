"""swarmtune command line: bootstrap, join, admit, revoke, id, pull, status, demo, simulate,
merge, export-base."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import io
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from swarmtune.aggregation.merge import MergeOptions

T = TypeVar("T")

DESCRIPTION = """Peer-to-peer DiLoCo fine-tuning of LoRA adapters over a hivemind DHT.

  coordinator:  swarmtune bootstrap --config configs/run.yaml
  volunteer:    swarmtune join --initial-peers MADDR --data builtin:arithmetic
  admission:    swarmtune id (volunteer) | admit PEER_ID | revoke PEER_ID (coordinator)
  consumer:     swarmtune pull --initial-peers MADDR --out ./adapter
  newcomer:     swarmtune demo --out ./demo-adapter
  merger:       swarmtune merge ADAPTER_DIR ADAPTER_DIR --method ties --out ./merged
  researcher:   swarmtune simulate --config configs/sim/ghbm-noniid.yaml --out ./sim
"""


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in low..high (a bad one is argparse's one-line error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


_positive_int = _int_in(1)
_port = _int_in(0, 65535)  # 0: any free port


class UsageError(ValueError):
    """Options that are wrong together (argparse checks each alone): exit 2, one line."""


def _peers_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        required=required,
        metavar="MADDR",
        help="multiaddr(s) of a peer in the run, as printed by `bootstrap`",
    )


def _net_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="IPv4 address to listen on (0.0.0.0: every interface)"
    )
    parser.add_argument("--port", type=_port, default=0, help="TCP port to listen on (0: any)")
    parser.add_argument(
        "--announce",
        nargs="+",
        metavar="IP",
        help="the address(es) other machines dial, e.g. a public or port-forwarded IP (needs"
        " --port)",
    )


def _report_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--report-to",
        choices=["tensorboard"],
        help="also log per-round scalars as TensorBoard event files in WORKDIR/tensorboard",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="swarmtune",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also show hivemind's logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    boot = sub.add_parser("bootstrap", help="start the coordinator peer of a run")
    boot.add_argument(
        "--config", type=Path, default=Path("configs/run.yaml"), help="run config YAML"
    )
    boot.add_argument(
        "--workdir",
        type=Path,
        default=Path("swarm-coordinator"),
        help="keeps the peer identity (same peer id after restart)",
    )
    boot.add_argument("--addr-file", type=Path, help="write the multiaddrs here once ready")
    _net_args(boot)
    boot.add_argument(
        "--http-port",
        type=_port,
        metavar="PORT",
        help="serve a live status page (and its JSON at /api/status) on this port; 0: any",
    )
    boot.add_argument(
        "--http-host",
        default="127.0.0.1",
        help="address of the status page (default loopback; 0.0.0.0 exposes it)",
    )
    _report_arg(boot)

    join = sub.add_parser("join", help="train with a run as a volunteer")
    _peers_arg(join)
    join.add_argument(
        "--data",
        required=True,
        help="builtin:<task> | a .jsonl/.json/.csv/.parquet/.txt file or a dir of them |"
        " hf:NAME[:split] (a data set in the local Hugging Face cache); records are"
        ' {"messages": [...]} chat, {"prompt", "completion"} or {"text"}',
    )
    join.add_argument(
        "--loss",
        choices=["completion", "full"],
        default="completion",
        help="train on completion / assistant tokens only (default) or on every token",
    )
    join.add_argument(
        "--packing",
        choices=["on", "off"],
        default="on",
        help="on: whole examples packed into rows, no attention across them (default);"
        " off: one example per row, padded",
    )
    join.add_argument(
        "--workdir",
        type=Path,
        default=Path("swarm-volunteer"),
        help="checkpoints, identity and metrics; restart with the same dir to resume",
    )
    join.add_argument(
        "--rounds", type=_positive_int, default=1_000_000, help="exit 0 after this many rounds"
    )
    join.add_argument(
        "--model",
        help="a causal LM: a local Hugging Face model dir, or a hub id (org/name) taken from"
        " the local Hugging Face cache or downloaded (default: the embedded base)",
    )
    join.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="where the base model trains (auto: CUDA, else MPS, else the CPU)",
    )
    join.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="autocast of the forward pass; LoRA weights, AdamW moments and everything averaged"
        " stay fp32, so volunteers of any precision share a run",
    )
    join.add_argument(
        "--quantize",
        choices=["4bit", "4bit-dq"],
        help="QLoRA: load the base in NF4 (4bit-dq: also quantize the block scales); CPU or CUDA",
    )
    join.add_argument(
        "--expect-config",
        type=Path,
        help="a run config YAML: refuse to join unless the run's LoRA setup matches it",
    )
    # the old name of --expect-config (every other command's --config is the config it runs)
    join.add_argument("--config", dest="old_config", type=Path, help=argparse.SUPPRESS)
    join.add_argument(
        "--threads",
        type=_positive_int,
        help="torch CPU threads (default: the cores shared among the volunteers running on "
        "this machine, rechecked every round)",
    )
    join.add_argument(
        "--eval-every",
        type=_positive_int,
        default=1,
        metavar="N",
        help="held-out eval loss every N rounds (default 1; on a real model it takes seconds)",
    )
    join.add_argument(
        "--wait-for",
        type=_positive_int,
        default=1,
        metavar="N",
        help="start the first round only once N volunteers (this one included) are in the run,"
        " unless it is under way already or this is a resume (default 1: start at once)",
    )
    join.add_argument(
        "--overlap",
        choices=["on", "off"],
        help="compute the next round while this one's exchange is in flight"
        " (default: the run's averaging.overlap)",
    )
    join.add_argument(
        "--ticket", default="", help="admission ticket for token runs (or @FILE holding it)"
    )
    _net_args(join)
    join.add_argument(
        "--reachability",
        choices=["auto", "direct", "relay"],
        default="auto",
        help="how others reach this peer: auto (default) asks the peer it joined through (the"
        " first of --initial-peers) to dial it back and falls back to relaying through that"
        " peer; direct (others can dial us); relay (always through that peer, e.g. behind NAT)",
    )
    join.add_argument(
        "--serve-relay",
        action="store_true",
        help="also relay for volunteers behind NAT that list this peer first in --initial-peers"
        " (needs a peer others can dial)",
    )
    _report_arg(join)

    admit = sub.add_parser(
        "admit", help="token runs: print a ticket admitting a volunteer's peer id"
    )
    admit.add_argument("peer_id", metavar="PEER_ID", help="as printed by `swarmtune id`")
    admit.add_argument(
        "--workdir", type=Path, default=Path("swarm-coordinator"), help="the coordinator's"
    )
    admit.add_argument("--hours", type=float, help="ticket lifetime (default: the run's)")

    revoke = sub.add_parser(
        "revoke", help="token runs: withdraw a volunteer's ticket (members drop it next round)"
    )
    revoke.add_argument("peer_id", metavar="PEER_ID", help="the volunteer to withdraw")
    revoke.add_argument(
        "--workdir", type=Path, default=Path("swarm-coordinator"), help="the coordinator's"
    )

    ident = sub.add_parser("id", help="print the peer id a work dir's identity has")
    ident.add_argument(
        "--workdir",
        type=Path,
        default=Path("swarm-volunteer"),
        help="the volunteer's work dir (its identity lives there)",
    )

    pull = sub.add_parser("pull", help="download an adapter as a PEFT directory")
    _peers_arg(pull)
    pull.add_argument("--out", type=Path, help="new directory for the adapter")
    pull.add_argument(
        "--adapter",
        default="global",
        help="adapter name (default: global); `library`: every cluster adapter, routed (PEFT Arrow)",
    )
    pull.add_argument("--list", action="store_true", help="only list adapters on offer")

    ev = sub.add_parser(
        "eval",
        help="completion loss, exact match and samples of an adapter beside the base model",
    )
    _peers_arg(ev, required=False)
    ev.add_argument("--adapter", type=Path, help="a PEFT adapter directory (or --initial-peers)")
    ev.add_argument("--data", required=True, help="examples to score, as `join --data` reads them")
    ev.add_argument("--model", help="the adapter's base: a local dir or hub id (default: embedded)")
    ev.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="where to run the model (default auto: CUDA, then MPS, then the CPU)",
    )
    ev.add_argument(
        "--max-length", type=_positive_int, default=512, help="tokens per example (default 512)"
    )
    ev.add_argument(
        "--max-examples", type=_positive_int, default=200, help="score the first N (default 200)"
    )
    ev.add_argument(
        "--samples", type=_int_in(0), default=3, help="rendered samples to show (default 3)"
    )
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")

    status = sub.add_parser("status", help="peers, rounds, losses and adapters of a run")
    _peers_arg(status)
    status.add_argument(
        "--json", action="store_true", help="print the status page's JSON instead of tables"
    )

    demo = sub.add_parser("demo", help="a whole swarm on 127.0.0.1, then pull its adapter")
    demo.add_argument(
        "--peers", type=_positive_int, help="volunteers (default 3; 8 with --clustered)"
    )
    demo.add_argument(
        "--rounds", type=_positive_int, help="DiLoCo rounds (default 6; 8 with --clustered)"
    )
    demo.add_argument(
        "--clustered",
        action="store_true",
        help="4 tasks x 2 volunteers in similarity clusters; pulls the `merged` adapter",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-adapter"), help="adapter directory")
    demo.add_argument("--config", type=Path, help="run config (default: the demo's built-in one)")
    demo.add_argument("--workdir", type=Path, help="where peers keep their files (default: temp)")

    sim = sub.add_parser(
        "simulate",
        help="K virtual clients with partial participation in one process (no network)",
        description="Runs K virtual clients through the daemon's round code (inner phase,"
        " the in-memory transport's all-gather, conclude_round); writes rounds.csv, summary.json and eval_loss.png to --out.",
    )
    sim.add_argument("--config", type=Path, required=True, help="simulator YAML (configs/sim/)")
    sim.add_argument("--out", type=Path, default=Path("sim-out"), help="output directory")
    sim.add_argument(
        "--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)"
    )

    merge = sub.add_parser(
        "merge",
        help="merge PEFT LoRA adapters (from anywhere) into one PEFT adapter",
        description="Merges LoRA task vectors dW = s*B@A per module. cat, linear and"
        " task_arithmetic are exact (rank = sum of ranks unless --rank); ties, dare_linear and"
        " dare_ties work on dense dW and are re-factorised by truncated SVD to --rank (default:"
        " the largest input rank), reporting the energy kept.",
    )
    merge.add_argument(
        "adapters", nargs="+", type=Path, metavar="ADAPTER_DIR", help="PEFT adapter dirs to merge"
    )
    from swarmtune.aggregation.merge import MERGE_METHODS

    merge.add_argument("--method", required=True, help=f"one of {', '.join(MERGE_METHODS)}")
    merge.add_argument(
        "--weights", nargs="+", type=float, help="one weight per adapter (default 1 each)"
    )
    merge.add_argument("--rank", type=_positive_int, help="target rank of the merged factors")
    merge.add_argument("--density", type=float, help="TIES: fraction of entries kept (0.2)")
    merge.add_argument("--drop", type=float, help="DARE: drop probability (0.5)")
    merge.add_argument("--scale", type=float, help="task arithmetic / TIES / DARE lambda (1.0)")
    merge.add_argument("--seed", type=int, help="DARE seed (0)")
    merge.add_argument(
        "--out", type=Path, required=True, help="new directory for the merged adapter"
    )

    export = sub.add_parser("export-base", help="write the embedded base model as a HF model dir")
    export.add_argument("--out", type=Path, required=True, help="new directory")
    return parser


def _setup_logging(verbose: bool) -> None:
    # hivemind logs every failed matchmaking attempt as a traceback; our own lines say what matters
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # models are local dirs only: no library may look anything up on the Hugging Face Hub (PEFT
    # asks it about the base model's config when it saves an adapter)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # `kill -USR1 PID` prints every thread's stack to the log: how to report a hung peer. Forked
    # children (the DHT and averager processes) inherit it. In-process callers may have a stderr
    # with no file under it (pytest's capture): they go without.
    with contextlib.suppress(io.UnsupportedOperation, ValueError):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    # bitsandbytes' CPU backend warns on import that an optional kernel package is missing;
    # the 4-bit path is CUDA-only here, so that line only confuses.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not verbose:
        # hivemind's DHT/averager processes (forked, so they inherit this) log a traceback
        # through asyncio whenever a peer hangs up mid-stream, e.g. when the coordinator leaves.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _options(cls: type[T], args: argparse.Namespace, **converted: Any) -> T:
    """A role's options dataclass from the parsed arguments, by name: each field takes the
    option of the same name, or its `converted` value."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **converted})


def _expect_config(args: argparse.Namespace) -> Path | None:
    """join's --expect-config, or its old name --config, which says it was renamed."""
    if args.old_config is not None:
        if args.expect_config is not None:
            raise UsageError("--config is the old name of --expect-config: give only one")
        logging.getLogger("swarmtune").warning(
            "join --config is now --expect-config (the run config to check the run against)"
        )
        return args.old_config
    return args.expect_config


def dispatch(args: argparse.Namespace) -> int:
    """Run one subcommand."""
    if args.command == "bootstrap":
        from swarmtune.node.roles.coordinator import BootstrapOptions, bootstrap

        return bootstrap(_options(BootstrapOptions, args))
    if args.command == "join":
        from swarmtune.node.roles.admit import load_ticket
        from swarmtune.node.roles.volunteer import JoinOptions, join

        return join(
            _options(
                JoinOptions,
                args,
                ticket=load_ticket(args.ticket) if args.ticket else "",
                expect_config=_expect_config(args),
                overlap=None if args.overlap is None else args.overlap == "on",
                packing=args.packing == "on",
            )
        )
    if args.command in ("admit", "revoke", "id"):
        return _admission(args)
    if args.command == "eval":
        from swarmtune.node.roles.evaluator import EvalOptions, evaluate

        return evaluate(_options(EvalOptions, args, as_json=args.json))
    if args.command == "pull":
        from swarmtune.node.roles.consumer import pull

        if args.out is None and not args.list:
            raise UsageError("--out is required (or --list)")
        return pull(args.initial_peers, args.out, args.adapter, args.list)
    if args.command == "status":
        from swarmtune.node.roles.consumer import status

        return status(args.initial_peers, args.json)
    if args.command == "demo":
        from swarmtune.node.roles.demo import DemoOptions, run_demo

        peers = args.peers or (8 if args.clustered else 3)
        rounds = args.rounds or (8 if args.clustered else 6)
        demo = DemoOptions(peers, rounds, args.out, args.config, args.workdir, args.clustered)
        return run_demo(demo)
    if args.command == "merge":
        from swarmtune.node.adapters.merge import merge_dirs

        options = _merge_options(args)
        merged = merge_dirs(args.adapters, args.method, args.out, args.weights, args.rank, options)
        kept = f"; SVD energy kept >= {min(merged.energy.values()):.4f}" if merged.energy else ""
        print(f"merged {len(args.adapters)} adapters with {args.method} into {args.out}{kept}")
        return 0
    if args.command == "simulate":
        import torch

        from swarmtune.node.config import load_sim_config
        from swarmtune.node.roles.simulate import simulate, summary_lines

        torch.set_num_threads(args.threads)
        config = load_sim_config(args.config)
        curves = simulate(
            config, args.out, args.config.stem, progress=logging.getLogger("sim").info
        )
        print("\n".join(summary_lines(curves)))
        print(f"wrote {args.out}/rounds.csv, summary.json and eval_loss.png")
        return 0
    from swarmtune.node.local.basemodel import export_base

    print(f"exported the embedded base model to {export_base(args.out)}")
    return 0


def _admission(args: argparse.Namespace) -> int:
    from swarmtune.node.roles import admit

    if args.command == "id":
        print(admit.peer_id(args.workdir))
    elif args.command == "admit":
        if args.hours is not None and not args.hours > 0:
            raise admit.SwarmError("--hours must be positive")
        print(admit.admit(args.workdir, args.peer_id, args.hours))
    else:
        revoked = admit.revoke(args.workdir, args.peer_id)
        print(f"revoked {args.peer_id}; {len(revoked)} revoked in all", file=sys.stderr)
    return 0


def _merge_options(args: argparse.Namespace) -> MergeOptions:
    """The method's MergeOptions from the options given; AdapterError for a bad method, an
    option the method would ignore, or a value out of range."""
    from swarmtune.aggregation.merge import MergeOptions, merge_method
    from swarmtune.node.adapters.adapter import AdapterError

    try:
        method = merge_method(args.method)
    except KeyError as exc:
        raise AdapterError(exc.args[0]) from None
    names = [f.name for f in dataclasses.fields(MergeOptions)]
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    unread = [n for n in given if n not in method.options]
    if unread:  # an option the method would silently ignore
        reads = ", ".join(f"--{o}" for o in method.options) or "none of them"
        raise AdapterError(f"{args.method} does not use --{unread[0]} (it reads: {reads})")
    options = MergeOptions(**given)
    if not 0 < options.density <= 1 or not 0 <= options.drop < 1:
        raise AdapterError("--density must be in (0, 1] and --drop in [0, 1)")
    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise AdapterError(f"--weights needs {len(args.adapters)} values, got {len(args.weights)}")
    return options


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one clear line on bad input, no traceback."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from swarmtune.node.errors import USER_ERRORS

    try:
        return dispatch(args)
    except USER_ERRORS + (UsageError,) as exc:
        print(f"swarmtune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"swarmtune {args.command}: interrupted", file=sys.stderr)
        return 130


def leave(code: int) -> None:
    """End the process with `code` at once, skipping the interpreter's teardown. By the time a
    command returns it has closed what it opened (peers, helper processes, files); what the
    teardown would still do is collect every module's objects, which takes 3-4 s on 2 cores
    with torch and transformers loaded, after the command's work is done. Helper processes
    that are still ending (they were told to) are waited for and reaped first: an orphan would
    end under PID 1, which in a container may never reap it."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.join(timeout=10)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """`swarmtune ...` and `python -m swarmtune.cli ...`: main(), then leave(). An argparse error or a
    crash raises out of main() and ends through the interpreter as usual."""
    leave(main())


if __name__ == "__main__":
    run()
