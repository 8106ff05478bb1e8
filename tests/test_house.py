"""House rules of the source tree that a refactor could quietly undo: modules meet through public
names only, the functional face stays thin, no module is named like a dependency, and the code
cites papers and bnlab.reference, not documents outside the project."""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "bnlab"
MODULES = sorted(SRC.rglob("*.py"))
DEPENDENCIES = {
    "torch",
    "numpy",
    "numba",
    "triton",
    "scipy",
    "sklearn",
    "click",
    "tqdm",
    "matplotlib",
    "onnx",
    "onnxruntime",
    "hypothesis",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_reaches(path: pathlib.Path) -> list[str]:
    """``from .x import _y`` and ``x._y`` where x is a name this module imported."""
    tree = ast.parse(path.read_text())
    imported, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += [f"from {node.module} import {a.name}" for a in node.names if _private(a.name)]
            imported |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
    external = {"torch", "np", "numba", "tl", "triton", "dist", "fx", "nn"}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in imported - external
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_modules_meet_through_public_names(path):
    assert private_reaches(path) == []


def test_the_checker_sees_a_private_reach(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from .functional import _check\nfrom . import ops\nops._kernel(1)\n")
    assert private_reaches(module) == ["from functional import _check", "line 3: ops._kernel"]


def test_functional_face_is_thin():
    assert len((SRC / "functional.py").read_text().splitlines()) <= 300


def test_no_module_is_named_like_a_dependency():
    assert [p for p in MODULES if p.stem in DEPENDENCIES] == []


def test_code_cites_papers_not_outside_documents():
    assert [p.name for p in MODULES if "SPEC" in p.read_text()] == []
