"""The package's import directions: data -> encoders -> model -> diffusion -> training, parallelism from outside.

Every import is counted, also those inside functions (lazy imports), so a rule cannot be dodged by deferring one.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PACKAGE = os.path.join(ROOT, "opendit")
ENTRY_MODULES = {"opendit.demo", "opendit.export"}  # `python -m` entry points, like the top-level scripts


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path: str) -> set:
    """Every module a file imports, relative imports resolved; `from a import b` counts a and a.b."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict:
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                modules[module_name(path)] = imports_of(path)
    return modules


GRAPH = graph()


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(source: str, forbidden: tuple) -> list:
    return sorted(f"{m} imports {i}" for m, imports in GRAPH.items() if under(m, source) for i in imports if under(i, *forbidden))


def test_graph_sees_the_package():
    assert "opendit.models.dit" in GRAPH and "opendit.training.train" in GRAPH and "opendit.parallel.mesh" in GRAPH
    assert "opendit.models.blocks" in GRAPH["opendit.models.dit"]  # imports are found
    assert "opendit.errors" in GRAPH["opendit.data.build"]


@pytest.mark.parametrize(
    "source, forbidden",
    [
        ("opendit.models", ("opendit.parallel", "opendit.training", "opendit.data", "opendit.checkpoint", "opendit.sampling", "torch.distributed")),
        ("opendit.diffusion", ("opendit.models", "opendit.kernels", "opendit.encoders", "opendit.data", "opendit.parallel", "opendit.training", "opendit.sampling", "opendit.checkpoint", "opendit.builders", "opendit.utils")),
        ("opendit.kernels", ("opendit.models", "opendit.parallel", "opendit.training", "opendit.sampling", "opendit.data", "opendit.checkpoint")),
        ("opendit.data", ("opendit.models", "opendit.builders", "opendit.training", "opendit.sampling", "opendit.parallel.parallelize")),
        ("opendit.encoders", ("opendit.models", "opendit.training", "opendit.sampling", "opendit.data")),
        ("opendit.parallel", ("opendit.training", "opendit.sampling", "opendit.data", "opendit.checkpoint")),
        ("opendit.checkpoint", ("opendit.training", "opendit.sampling")),
        ("opendit.errors", ("opendit.models", "opendit.parallel", "opendit.training", "opendit.sampling", "opendit.data")),
    ],
)
def test_import_directions(source, forbidden):
    assert violations(source, forbidden) == []


def test_nothing_imports_an_entry_script():
    entries = ENTRY_MODULES | {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py") and f != "setup.py"}
    bad = sorted(f"{m} imports {i}" for m, imports in GRAPH.items() for i in imports if i in entries or (i.startswith("opendit.") and i in ENTRY_MODULES and m not in ENTRY_MODULES))
    assert bad == []


def test_models_never_reach_torch_distributed():
    text = "".join(open(os.path.join(PACKAGE, "models", f)).read() for f in os.listdir(os.path.join(PACKAGE, "models")) if f.endswith(".py"))
    assert "torch.distributed" not in text and "dist." not in text
