"""A start-up server for the integration tests: it imports the CLI and its heavy dependencies
(torch, transformers, peft, hivemind: about 9 s of CPU per process on 2 cores) once, then
forks one child per `swarmtune ...` command the harness asks for. Each child is a fresh
command from there on: its own session and process group, its own log, its environment and
arguments, `cli.main(argv)` and a normal interpreter exit (atexit handlers run).

Protocol, one JSON line each way on stdin/stdout:
  -> {"argv": [...], "env": {...}, "stdout": PATH, "stderr": PATH, "exit": PATH,
      "netns": NAME or absent (run the command inside that network namespace),
      "script": PATH or absent (run `python PATH ARGV` instead of `swarmtune ARGV`)}
  <- {"pid": PID}
When a child ends, its exit code (negative: the signal, as in subprocess) is written to the
"exit" path. End of stdin ends the server; children it started keep running.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
# what cli._setup_logging sets before these libraries are imported in a plain `python -m cli`
os.environ.setdefault("HIVEMIND_LOGLEVEL", "CRITICAL")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# what every volunteer's first get_peft_model imports: PEFT's LoRA layers for bitsandbytes,
# whose CPU kernels register through torch.compile (about 4 s of CPU, here once instead of in
# every child)
import peft.tuners.lora.bnb  # noqa: E402, F401
from hivemind.utils.mpfuture import MPFuture  # noqa: E402

import swarmtune.node.roles.admit  # noqa: E402, F401
import swarmtune.node.roles.consumer  # noqa: E402, F401
import swarmtune.node.roles.coordinator  # noqa: E402, F401
import swarmtune.node.roles.volunteer  # noqa: E402, F401
from swarmtune import cli  # noqa: E402


def _enter_netns(name: str) -> None:
    """Move this (single-threaded, freshly forked) process into network namespace `name`, as
    `ip netns exec` does for the network (Python 3.11 has no os.setns)."""
    import ctypes

    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    finally:
        os.close(fd)


def _run_child(request: dict) -> int:
    """In the forked child: become the requested command; returns its exit code."""
    os.setsid()
    # hivemind's MPFuture keeps process-wide multiprocessing locks, made when it is imported:
    # here, once in the zygote, so every command forked from it would share them with every
    # other. A peer SIGKILLed while holding one (the crash tests kill peers) then blocked the
    # next command's DHT start-up for good ("no address in 60s"). A command started as
    # `python -m cli` makes its own; so does this one.
    MPFuture.reset_backend()
    if request.get("netns"):
        _enter_netns(request["netns"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (null, out, err):
        os.close(fd)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the server's request pipe is not ours
    os.environ.clear()
    os.environ.update(request["env"])
    script = request.get("script")
    sys.argv = [script, *request["argv"]] if script else ["cli", *request["argv"]]
    try:
        if script:  # a bench script run as `python SCRIPT ARGS` (its imports are ours already)
            import runpy

            runpy.run_path(script, run_name="__main__")
            code = 0
        else:
            code = cli.main(request["argv"])
    except SystemExit as exc:  # argparse errors and SystemExit("message"), as the interpreter does
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - a crash prints its traceback, as the interpreter does
        traceback.print_exc()
        code = 1
    return code


def _reap(children: dict[int, str]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = children.pop(pid, None)
        if path is not None:
            with open(path + ".tmp", "w") as file:
                file.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(path + ".tmp", path)


def serve() -> int | None:
    """Answer requests until stdin ends; in a forked child, the child's exit code instead."""
    children: dict[int, str] = {}
    print(json.dumps({"ready": os.getpid()}), flush=True)
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.1)
        _reap(children)
        if not readable:
            continue
        line = sys.stdin.readline()
        if not line:
            return None
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return _run_child(request)
        children[pid] = request["exit"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # answer once it leads its own process group
            try:
                if os.getpgid(pid) == pid:
                    break
            except ProcessLookupError:
                break
            time.sleep(0.001)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    code = serve()
    if code is not None:
        cli.leave(code)  # a child ends as `python -m cli` does
    sys.exit(0)
