"""The dependency rules of STYLE.md, enforced by walking imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = sorted((ROOT / "pipeline").rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: p.name)
def test_pipeline_never_imports_workers_or_argparse_nor_installs_signal_handlers(path):
    assert not _top(_imports(path)) & {"workers", "argparse"}
    assert "signal.signal(" not in path.read_text()


@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: p.name)
def test_only_the_adapters_import_their_libraries(path):
    top = _top(_imports(path))
    if "kafka" in top:
        assert path.parent.name == "kafka", "only pipeline/kafka/ imports kafka-python"
    if "prometheus_client" in top:
        assert path.name == "metrics.py"


@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: p.name)
def test_only_config_reads_the_environment(path):
    if path.name in {"config.py"}:
        return
    assert "os.environ" not in path.read_text() and "getenv" not in path.read_text()


@pytest.mark.parametrize(
    "path",
    PIPELINE + sorted((ROOT / "workers").rglob("*.py")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_serving_code_never_imports_the_in_memory_test_doubles(path):
    assert "pipeline.memorybus" not in _imports(path)


@pytest.mark.parametrize("name", ["scoring.py", "state.py", "logtracker.py"])
def test_pure_modules_depend_on_numpy_only(name):
    allowed = {
        "numpy",
        "hashlib",
        "bisect",
        "collections",
        "dataclasses",
        "typing",
        "pipeline",
        "__future__",
        "math",
        "sys",
    }
    assert _top(_imports(ROOT / "pipeline" / name)) <= allowed


@pytest.mark.parametrize("name", ["loop.py", "codec.py", "state.py", "store.py", "memorybus.py"])
def test_loop_and_codec_import_without_torch(name):
    seen: set[str] = set()
    todo = [ROOT / "pipeline" / name]
    while todo:
        path = todo.pop()
        for module in _imports(path):
            top = module.split(".")[0]
            assert top not in {"torch", "transformers"}, f"{path.name} pulls in {module}"
            if top == "pipeline" and module not in seen:
                seen.add(module)
                target = ROOT / (module.replace(".", "/") + ".py")
                if target.exists():
                    todo.append(target)


@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: p.name)
def test_every_pipeline_module_declares_all_and_a_docstring(path):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.name} has no module docstring"
    if path.name != "__init__.py":
        assert any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
            for n in tree.body
        ), f"{path.name} has no __all__"


# -- the import graph of the whole project ---------------------------------------------------------
PACKAGES = ("pipeline", "workers", "tests")
WORKERS = sorted((ROOT / "workers").rglob("*.py"))
LAB = ROOT / "workers" / "lab"
# The one module that reaches both the roles and the lab: the CLI dispatches every command.
BRIDGES = {"workers/cli.py"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function (a lazy import
    closes a circle all the same); `from pkg import mod` counts as importing pkg.mod."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}"
                if _module_path(f"{node.module}.{alias.name}")
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES and _module_path(n))
    return found


def _graph() -> dict[str, set[str]]:
    paths = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    return {_module_name(p): _project_imports(p) - {_module_name(p)} for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_circle_through_a_lazy_import():
    """The check below can fail: a circle like the one runtime once closed is reported."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize(
    "path", [p for p in WORKERS if LAB not in p.parents], ids=lambda p: str(p.relative_to(ROOT))
)
def test_roles_and_operator_commands_never_import_the_lab(path):
    if str(path.relative_to(ROOT)) in BRIDGES:
        return
    lab = {n for n in _project_imports(path) if n == "workers.lab" or n.startswith("workers.lab.")}
    assert not lab, f"{path.relative_to(ROOT)} imports lab code {sorted(lab)}"


def test_the_runtime_imports_no_worker():
    """It runs any role from the role's SPEC alone; the roles import it, never the reverse."""
    assert _project_imports(ROOT / "workers" / "runtime.py") & {
        _module_name(p) for p in WORKERS
    } <= {"workers.spec"}
    text = (ROOT / "workers" / "runtime.py").read_text()
    for role in ("updater", "scorer", "finetune"):
        assert f'"{role}"' not in text, f"runtime names the {role} role"


@pytest.mark.parametrize("role", ["updater", "scorer", "finetune"])
def test_every_role_declares_a_spec_and_run(role):
    import importlib

    from workers.spec import WorkerSpec

    module = importlib.import_module(f"workers.{role}")
    assert isinstance(module.SPEC, WorkerSpec) and module.SPEC.name == role
    assert callable(module.run)


# -- files small enough to hold in your head -------------------------------------------------------
MAX_LINES = 400
# Modules allowed past MAX_LINES, each with the reason also written at its top ("Size: ...").
# The list is exact: a module that shrinks below the limit leaves it, one that grows joins it.
LONG_MODULES = {
    "pipeline/config.py",  # one dataclass field per setting, with its why and its check
    "pipeline/loop.py",  # the iteration, rebalance hooks and per-record isolation: one protocol
    "pipeline/scoring.py",  # every step from scores to the published list
    "pipeline/training.py",  # fit, evaluate and their data: one training story
    "pipeline/encoder_cache.py",  # the cache and the full encodes it must equal
    "pipeline/kafka/source.py",  # the consumer adapter with rebalance and reset handling
    "workers/cli.py",  # the argument surface of every command in one place
    "workers/updater.py",  # fold, refresh and co-located scoring of one micro-batch
    "workers/finetune.py",  # the handler and its background run: one lifecycle
    "workers/lab/experiment.py",  # one experiment protocol, its arms and its report
    "workers/lab/evaluate.py",  # the split, the seeded fits and the two-protocol report
    "workers/lab/chaos_harness.py",  # process control, replay and collector of the scenarios
    "workers/lab/chaos_scenarios.py",  # one schedule and check list per scenario
}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.mark.parametrize("path", PIPELINE + WORKERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_long_without_a_reason_at_its_top(path):
    name = str(path.relative_to(ROOT))
    if _lines(path) <= MAX_LINES:
        assert name not in LONG_MODULES, f"{name} is short now: take it off LONG_MODULES"
        return
    assert name in LONG_MODULES, f"{name} has {_lines(path)} lines (> {MAX_LINES}): split it"
    assert "Size:" in (ast.get_docstring(ast.parse(path.read_text())) or ""), (
        f"{name} is long: say why at its top, in a 'Size:' paragraph of its docstring"
    )
