"""The demo's process handling: a volunteer that fails ends the wait at once."""

from __future__ import annotations

import subprocess
import sys

from swarmtune.node.roles.demo import wait_all


def _python(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], text=True)


def test_a_failed_volunteer_ends_the_wait_while_the_others_still_run() -> None:
    # the others may be waiting for it (join --wait-for): waiting for them would never end
    waiting, failed = _python("import time; time.sleep(60)"), _python("raise SystemExit(3)")
    try:
        assert wait_all([waiting, failed], poll_s=0.05) == [None, 3]
    finally:
        waiting.kill()
        waiting.wait()


def test_the_exit_codes_once_all_ended() -> None:
    assert wait_all([_python("pass"), _python("pass")], poll_s=0.05) == [0, 0]
