"""Every private hivemind name protocols/ overrides or writes still exists, with the shape we
rely on. pyproject.toml pins hivemind exactly (1.1.12); a version that renames one of these fails
here, by name, instead of failing quietly in a running swarm."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version

import pytest
from hivemind import DHT, DecentralizedAverager
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.p2p import P2P

# (where we use it, the object that must have it, the name, what it must be)
PATCHED = [
    ("protocols/hivemind_private.py: relay flag for p2pd", P2P, "_make_process_args", "callable"),
    ("protocols/hivemind_private.py: relayed connect", P2P, "_client", "instance attribute"),
    (
        "protocols/matchmaking.py: checked leader stub",
        DecentralizedAverager,
        "get_stub",
        "callable",
    ),
    ("protocols/matchmaking.py: quiet shutdown", DecentralizedAverager, "_shutdown", "coroutine"),
    ("protocols/matchmaking.py: run override", DecentralizedAverager, "run", "callable"),
    (
        "protocols/hivemind_private.py: close a full group",
        DecentralizedAverager,
        "_matchmaking",
        "instance attribute",
    ),  # fmt: skip
    (
        "protocols/hivemind_private.py: close a full group",
        Matchmaking,
        "target_group_size",
        "instance attribute",
    ),  # fmt: skip
    (
        "protocols/hivemind_private.py: our ticket in join answers",
        Matchmaking,
        "step_control",
        "instance attribute",
    ),  # fmt: skip
    ("protocols/hivemind_private.py: QuietDHT", DHT, "run", "callable"),
]


def test_hivemind_is_the_pinned_version() -> None:
    assert version("hivemind") == "1.1.12"


@pytest.mark.parametrize("where,owner,name,kind", PATCHED, ids=[p[0] + " " + p[2] for p in PATCHED])
def test_each_private_name_we_patch_is_there(where: str, owner: type, name: str, kind: str) -> None:
    if kind == "instance attribute":  # set and read by the class itself
        assert re.search(rf"self\.{name}\b", inspect.getsource(owner)), (where, owner, name)
        return
    found = inspect.getattr_static(owner, name, None)
    assert found is not None, f"{where}: {owner.__name__}.{name} is gone"
    target = getattr(owner, name)
    assert callable(target), (where, name)
    if kind == "coroutine":
        assert inspect.iscoroutinefunction(target), (where, name)
