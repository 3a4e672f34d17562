"""Imports flow one way: cli -> node -> protocols -> aggregation (walk the ASTs)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "aggregation": {
        "node",
        "protocols",
        "cli",
        "hivemind",
        "asyncio",
        "socket",
        "requests",
        "transformers",
        "peft",
        "safetensors",
    },
    "protocols": {"node", "cli"},
    "node": {"cli", "hivemind"},  # the wire, hivemind included, lives in protocols/ only
}


def _root(name: str) -> str:
    """The top-level name an import reaches: for our own modules, the folder under swarmtune."""
    parts = name.split(".")
    return parts[1] if parts[0] == "swarmtune" and len(parts) > 1 else parts[0]


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for item in ast.walk(ast.parse(path.read_text())):
        if isinstance(item, ast.Import):
            roots.update(_root(alias.name) for alias in item.names)
        elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
            roots.add(_root(item.module))
            if item.module == "swarmtune":  # from swarmtune import cli
                roots.update(alias.name for alias in item.names)
    return roots


def _bare_imports(path: Path) -> set[str]:
    """Imports of our packages by their folder name instead of through swarmtune."""
    ours = {*FORBIDDEN, "cli"}
    found: set[str] = set()
    for item in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(item, ast.Import):
            names = [alias.name for alias in item.names]
        elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
            names = [item.module]
        found.update(n for n in names if n.split(".")[0] in ours)
    return found


def test_everything_imports_our_packages_through_the_swarmtune_namespace() -> None:
    # what is installed is swarmtune.node, swarmtune.cli, ...: an import by the bare folder
    # name would work only from the repository's root, and load a second copy of the module
    files = [
        ROOT / "cli.py",
        *(p for d in (*FORBIDDEN, "tests", "bench") for p in (ROOT / d).rglob("*.py")),
    ]
    bare = {str(p.relative_to(ROOT)): sorted(_bare_imports(p)) for p in files if _bare_imports(p)}
    assert not bare, bare


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    for path in files:
        bad = _imported_roots(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_aggregation_imports_only_torch_and_stdlib() -> None:
    import sys

    allowed = {"torch", "aggregation", "__future__"} | set(sys.stdlib_module_names)
    for path in (ROOT / "aggregation").rglob("*.py"):
        extra = _imported_roots(path) - allowed
        assert not extra, f"{path.name} imports {sorted(extra)}"


def _runtime_imports(path: Path) -> set[str]:
    """Project modules `path` imports when it runs (anywhere in it, functions included; not
    under `if TYPE_CHECKING:`), as dotted names."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found: set[str] = set()
    for item in ast.walk(tree):
        if id(item) in typing_only:
            continue
        if isinstance(item, ast.Import):
            found.update(alias.name for alias in item.names)
        elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
            found.add(item.module)
            found.update(f"{item.module}.{alias.name}" for alias in item.names)
    ours = {n.removeprefix("swarmtune.") for n in found if n.startswith("swarmtune.")}
    return {name for name in ours if name.split(".")[0] in {*FORBIDDEN, "cli"}}


def test_no_two_modules_import_each_other() -> None:
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): path
        for package in FORBIDDEN
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    }
    graph = {name: _runtime_imports(path) & set(modules) for name, path in modules.items()}
    cycles = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph[b])
    assert not cycles, cycles


# what runs without a network: the round engine (all but its hivemind transport), the
# simulator, and the wire's schemas, signatures and group types they read
WITHOUT_HIVEMIND = [
    *sorted(
        "swarmtune." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "node" / "engine").glob("*.py")
        if path.stem not in ("__init__", "swarm_transport")
    ),
    "swarmtune.node.roles.simulate",
    "swarmtune.protocols.records",
    "swarmtune.protocols.certificates",
    "swarmtune.protocols.identity",
    "swarmtune.protocols.group",
]


def _loaded(steps: list[tuple[list[str], tuple[str, ...]]]) -> list[list[str]]:
    """In one fresh interpreter, step by step: import the step's modules, then list which of
    the libraries named by its prefixes are loaded by then (direct imports, above, cannot see
    what an imported module imports)."""
    import subprocess
    import sys

    probe = "import importlib, sys\n"
    for modules, prefixes in steps:
        probe += (
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules"
            f" if m.startswith({prefixes!r})}}))\n"
        )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [ast.literal_eval(line) for line in done.stdout.strip().splitlines()[-len(steps) :]]


def test_the_engine_loads_no_model_library_and_with_the_simulator_no_hivemind() -> None:
    # the engine only moves tensors: the trainer (transformers, peft) loads where it runs;
    # one interpreter for both checks (each costs the imports), the engine imported first
    engine = [m for m in WITHOUT_HIVEMIND if m.startswith("swarmtune.node.engine.")]
    rest = [m for m in WITHOUT_HIVEMIND if m not in engine]
    model_libraries, network = _loaded(
        [(engine, ("transformers", "peft", "bitsandbytes")), (rest, ("hivemind",))]
    )
    assert model_libraries == [] and network == []
