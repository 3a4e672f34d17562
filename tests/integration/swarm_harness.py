"""Start real swarmtune processes on 127.0.0.1 and always end them (by PID / process group).

Processes come from tests/integration/zygote.py, which imports the CLI's dependencies once and
forks a fresh command per request (a swarm's start-up was mostly those imports, repeated per
process). `Swarm(..., forked=False)` runs `python -m cli` itself instead, as a user does.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[2]
# as the CLI does: plain PEFT loads below must not ask the Hugging Face Hub about "embedded"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT))
from swarmtune.node.local.data import data_spec  # noqa: E402

FAST_CONFIG = """run_id: {run_id}
inner: {{steps: 10, batch_size: 8, seq_len: 48}}
averaging: {{matchmaking_time: 2.0}}
"""


NEVER = 10**9  # --eval-every for volunteers whose test reads no eval numbers (Swarm.evaluate)

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Proc(Protocol):
    """What the tests use of a process: subprocess.Popen, or a ForkedProc."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class ForkedProc:
    """A command the zygote forked: Popen's poll/wait, from the exit file the zygote writes."""

    def __init__(self, pid: int, exit_file: Path, args: list[str]) -> None:
        self.pid, self.exit_file, self.args = pid, exit_file, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.exit_file.exists():
            self.returncode = int(self.exit_file.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode


class Zygote:
    """The one zygote.py server of this test session, started on first use."""

    _lock = threading.Lock()
    _server: subprocess.Popen[str] | None = None

    @classmethod
    def fork(
        cls,
        args: list[str],
        stdout: Path,
        stderr: Path,
        exit_file: Path,
        netns: str = "",
        script: str = "",
    ) -> ForkedProc:
        """Start `swarmtune ARGS` (or `python SCRIPT ARGS`; output appended to stdout/stderr)
        in its own session, inside network namespace `netns` if given."""
        with cls._lock:
            server = cls._started()
            request = {"argv": args, "env": ENV, "stdout": str(stdout), "stderr": str(stderr)}
            if netns:
                request["netns"] = netns
            if script:
                request["script"] = script
            assert server.stdin is not None and server.stdout is not None
            server.stdin.write(json.dumps({**request, "exit": str(exit_file)}) + "\n")
            server.stdin.flush()
            answer = server.stdout.readline()
            assert answer, "the zygote died: see its log in the temp dir"
            return ForkedProc(json.loads(answer)["pid"], exit_file, args)

    @classmethod
    def _started(cls) -> subprocess.Popen[str]:
        if cls._server is None or cls._server.poll() is not None:
            log = open(Path(tempfile.mkdtemp(prefix="swarmtune-zygote-")) / "zygote.log", "ab")
            cls._server = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("zygote.py"))],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=ENV,
                text=True,
                start_new_session=True,
            )
            assert cls._server.stdout is not None
            ready = cls._server.stdout.readline()
            assert ready, f"the zygote did not start: see {log.name}"
            atexit.register(cls._stop, cls._server)
        return cls._server

    @staticmethod
    def _stop(server: subprocess.Popen[str]) -> None:
        if server.poll() is None:
            assert server.stdin is not None
            server.stdin.close()  # end of requests: it exits
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def dump_stacks(pgid: int, settle: float = 0.5) -> None:
    """Ask every Python process of a process group for its threads' stacks (the CLI prints them
    to its log on SIGUSR1), one at a time so that they do not interleave, so that a hang a test
    times out on shows where it hangs."""
    for entry in Path("/proc").iterdir():
        try:
            pid = int(entry.name)
            if pid == os.getpid() or os.getpgid(pid) != pgid:
                continue
            if "python" in (entry / "comm").read_text():
                os.kill(pid, signal.SIGUSR1)
                time.sleep(settle)
        except (OSError, ValueError):
            continue


class Swarm:
    """A coordinator and volunteers as separate processes, each in its own process group."""

    def __init__(
        self,
        tmp: Path,
        run_id: str = "itest-run",
        config_text: str | None = None,
        forked: bool = True,
        evaluate: bool = False,
    ) -> None:
        """`evaluate`: volunteers run their held-out eval every round (`join`'s default). Off,
        they skip it, unless a test passes its own --eval-every: few tests read the numbers, and
        each eval sits on the round's critical path (about 0.4 s of CPU per volunteer per round
        on the tiny model, which on 2 cores shared by 3-4 volunteers lengthens every round)."""
        self.tmp = tmp
        self.evaluate = evaluate
        self.config = tmp / "run.yaml"
        self.config.write_text(config_text or FAST_CONFIG.format(run_id=run_id))
        self.procs: dict[str, Proc] = {}
        self.maddr = ""
        self.forked = forked

    def spawn(self, name: str, *args: str, forked: bool | None = None, netns: str = "") -> Proc:
        """Run `swarmtune ARGS` with output to tmp/NAME.log (`forked` overrides the swarm's),
        inside network namespace `netns` if given (forked only)."""
        path = self.tmp / f"{name}.log"
        proc: Proc
        if self.forked if forked is None else forked:
            exit_file = self.tmp / f".{name}.{len(self.procs)}.{time.monotonic_ns()}.exit"
            proc = Zygote.fork(list(args), path, path, exit_file, netns)
        else:
            proc = subprocess.Popen(
                [sys.executable, "-m", "swarmtune.cli", *args],
                cwd=ROOT,
                stdout=open(path, "ab"),  # noqa: SIM115 - the child holds it
                stderr=subprocess.STDOUT,
                env=ENV,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def run_script(self, name: str, script: Path, *args: str) -> Proc:
        """`python SCRIPT ARGS` (a bench script), forked from the zygote, output to
        tmp/NAME.log: its imports are the zygote's, not 10-15 s of its own."""
        path = self.tmp / f"{name}.log"
        exit_file = self.tmp / f".{name}.{len(self.procs)}.{time.monotonic_ns()}.exit"
        proc = Zygote.fork(list(args), path, path, exit_file, script=str(script))
        self.procs[name] = proc
        return proc

    def start_coordinator(self, *extra: str, timeout: float = 60, netns: str = "") -> str:
        """Start `bootstrap` (with extra flags) and wait for its address file."""
        addr = self.tmp / "addr.txt"
        self.spawn(
            "coord",
            "bootstrap",
            "--config",
            str(self.config),
            "--workdir",
            str(self.tmp / "coord"),
            "--addr-file",
            str(addr),
            *extra,
            netns=netns,
        )
        deadline = time.monotonic() + timeout
        while not (addr.exists() and addr.read_text().strip()):
            assert self.procs["coord"].poll() is None, self.log("coord")
            if time.monotonic() > deadline:
                dump_stacks(self.procs["coord"].pid)
                raise AssertionError(f"no address in {timeout}s:\n{self.log('coord')}")
            time.sleep(0.2)
        self.maddr = addr.read_text().split()[0]
        return self.maddr

    def join(
        self,
        name: str,
        task: str,
        rounds: int,
        *extra: str,
        forked: bool | None = None,
        netns: str = "",
    ) -> Proc:
        """Start a volunteer on a built-in task (or on the data spec `task`, when it is one)."""
        if not self.evaluate and "--eval-every" not in extra:
            extra = (*extra, "--eval-every", str(NEVER))
        return self.spawn(
            name,
            "join",
            "--initial-peers",
            self.maddr,
            "--data",
            data_spec(task),
            "--workdir",
            str(self.tmp / name),
            "--rounds",
            str(rounds),
            "--threads",
            "1",
            *extra,
            forked=forked,
            netns=netns,
        )

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a short CLI command to completion."""
        if not self.forked:
            return subprocess.run(
                [sys.executable, "-m", "swarmtune.cli", *args],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=ENV,
            )
        with tempfile.TemporaryDirectory(prefix="swarmtune-cli-") as out:
            stdout, stderr = Path(out) / "stdout", Path(out) / "stderr"
            proc = Zygote.fork(list(args), stdout, stderr, Path(out) / "exit")
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            return subprocess.CompletedProcess(
                list(args),
                code,
                stdout.read_text(errors="replace"),
                stderr.read_text(errors="replace"),
            )

    def cli_many(
        self, *commands: tuple[str, ...], timeout: float = 120
    ) -> list[subprocess.CompletedProcess[str]]:
        """Several short CLI commands at once (their start-up, mostly imports, overlaps)."""
        with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
            return list(pool.map(lambda args: self.cli(*args, timeout=timeout), commands))

    def wait(self, name: str, timeout: float) -> int:
        """Exit code of a process (fails the test with its log on timeout)."""
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            dump_stacks(self.procs[name].pid)
            raise AssertionError(f"{name} did not exit in {timeout}s:\n{self.log(name)}") from None

    def log(self, name: str) -> str:
        """What a process printed so far."""
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group of one of our processes."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)

    def close(self) -> None:
        """SIGTERM every process group we started, then SIGKILL what is left."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def load_with_plain_peft(base_dir: Path, adapter_dir: Path) -> Any:
    """PeftModel.from_pretrained(base, adapter_dir), failing on PEFT's missing-keys warning.

    PEFT reports missing adapter keys with warnings.warn, not logging, so caplog cannot see it.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(base, adapter_dir)
    missing = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    assert not missing, missing
    return model


def assert_lora_weights_are_the_files(model: Any, adapter_dir: Path) -> None:
    """The loaded adapter's tensors (PEFT's saved names) equal adapter_model.safetensors'."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    files = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(files)
    for name, tensor in files.items():
        assert loaded[name].dtype == tensor.dtype and bool((loaded[name] == tensor).all()), name
