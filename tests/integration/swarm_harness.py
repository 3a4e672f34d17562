"""Start real swarmtune processes on 127.0.0.1 and always end them (by PID / process group)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# as the CLI does: plain PEFT loads below must not ask the Hugging Face Hub about "embedded"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAST_CONFIG = """run_id: {run_id}
inner: {{steps: 10, batch_size: 8, seq_len: 48}}
averaging: {{matchmaking_time: 2.0}}
"""


class Swarm:
    """A coordinator and volunteers as separate processes, each in its own process group."""

    def __init__(
        self, tmp: Path, run_id: str = "itest-run", config_text: str | None = None
    ) -> None:
        self.tmp = tmp
        self.config = tmp / "run.yaml"
        self.config.write_text(config_text or FAST_CONFIG.format(run_id=run_id))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.maddr = ""

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Run `python -m cli ARGS` with output to tmp/NAME.log."""
        log = open(self.tmp / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_coordinator(self, *extra: str, timeout: float = 60) -> str:
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
        )
        deadline = time.monotonic() + timeout
        while not (addr.exists() and addr.read_text().strip()):
            assert time.monotonic() < deadline, self.log("coord")
            assert self.procs["coord"].poll() is None, self.log("coord")
            time.sleep(0.2)
        self.maddr = addr.read_text().split()[0]
        return self.maddr

    def join(self, name: str, task: str, rounds: int, *extra: str) -> subprocess.Popen[bytes]:
        """Start a volunteer on a built-in task."""
        return self.spawn(
            name,
            "join",
            "--initial-peers",
            self.maddr,
            "--data",
            f"builtin:{task}",
            "--workdir",
            str(self.tmp / name),
            "--rounds",
            str(rounds),
            "--threads",
            "1",
            *extra,
        )

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a short CLI command to completion."""
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
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
