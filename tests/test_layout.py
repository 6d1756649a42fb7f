"""The package's layout as docs/architecture.md describes it: subpackages by stage, small modules and classes,
every public import path of earlier releases still working."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import lightning_svcca

PACKAGE = Path(lightning_svcca.__file__).parent
SUBPACKAGES = ("measures", "core", "pipeline", "monitoring", "freezing", "output", "integrations", "offline", "cli")
#: Import paths that earlier releases documented; each must keep working.
COMPATIBILITY_MODULES = {
    "lightning_svcca.callback": ["SVCCACallback", "SVCCAMonitorWarning"],
    "lightning_svcca.lightning": ["SVCCACallback"],
    "lightning_svcca.huggingface": ["SVCCATrainerCallback"],
    "lightning_svcca.similarity": ["cca", "svcca", "pwcca", "linear_cka", "decompose", "Decomposition"],
}
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_CODE_LINES = 600, 300, 60


def _code_lines(lines: list[str], node: ast.AST) -> int:
    """Lines of ``node`` that are code: not blank, not comments, not docstrings."""
    docstrings: set[int] = set()
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(
        1
        for number in range(node.lineno, node.end_lineno + 1)
        if number not in docstrings and lines[number - 1].strip() and not lines[number - 1].strip().startswith("#")
    )


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_stage_is_a_documented_subpackage() -> None:
    for name in SUBPACKAGES:
        module = importlib.import_module(f"lightning_svcca.{name}")
        assert module.__doc__ and len(module.__doc__.split()) > 10, f"{name}/__init__.py needs its paragraph"
    loose = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "_lazy", *COMPATIBILITY_MODULES_STEMS}
    assert not loose, f"modules outside the subpackages: {sorted(loose)}"


COMPATIBILITY_MODULES_STEMS = {name.rsplit(".", 1)[1] for name in COMPATIBILITY_MODULES}


@pytest.mark.parametrize("path", _sources(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_modules_classes_and_functions_stay_small(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"class {node.name}: {size} lines"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            size = _code_lines(lines, node)
            assert size <= MAX_FUNCTION_CODE_LINES, f"{node.name}(): {size} lines of code"


def test_every_public_name_imports() -> None:
    for name in lightning_svcca.__all__:
        assert getattr(lightning_svcca, name) is not None
    for module_name, names in COMPATIBILITY_MODULES.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert getattr(module, name) is not None, f"{module_name}.{name}"
    from lightning_svcca.similarity import __all__ as math_names

    assert set(math_names) >= {"cca", "svcca", "svcca_details", "pwcca", "linear_cka", "procrustes", "rbf_cka"}
