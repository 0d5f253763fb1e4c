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


@pytest.mark.parametrize("path", PIPELINE + sorted((ROOT / "workers").rglob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_serving_code_never_imports_the_in_memory_test_doubles(path):
    assert "pipeline.memorybus" not in _imports(path)


@pytest.mark.parametrize("name", ["scoring.py", "state.py", "logtracker.py"])
def test_pure_modules_depend_on_numpy_only(name):
    allowed = {"numpy", "hashlib", "bisect", "collections", "dataclasses", "typing", "pipeline",
               "__future__", "math", "sys"}
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
        assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
                   for n in tree.body), f"{path.name} has no __all__"
