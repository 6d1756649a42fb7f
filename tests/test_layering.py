"""The package's layers hold: every import between subpackages points down the order docs/architecture.md states.

Every module's imports are read with :mod:`ast`: top-level ones, those inside functions, and those under
``if TYPE_CHECKING:`` (they get no exception: a type a lower layer needs from a higher one means the type sits in the
wrong layer). A subpackage may import itself and any subpackage in a lower layer; two subpackages in the same layer
may not import each other. The package's root modules (``__init__.py`` and the one-line compatibility modules) are
the public face above every layer; nothing in a subpackage imports them, except names the root defines itself
(``__version__``). ``_lazy.py`` sits below everything and imports nothing of the package.

Run as a script (``python tests/test_layering.py [ROOT]``) it prints the import graph between subpackages, with the
imports that point up listed under it.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGE_NAME = "lightning_svcca"
ROOT = Path(__file__).resolve().parents[1]
#: The layers, bottom to top; a layer's subpackages are peers and do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("measures",),
    ("core",),
    ("pipeline",),
    ("freezing", "output"),
    ("monitoring",),
    ("integrations", "offline"),
    ("cli",),
)
#: Modules at the package's root that sit below every layer (they import nothing of the package).
BOTTOM_HELPERS = ("_lazy",)
#: Where the documented order lives, and the sentence that states it.
ARCHITECTURE = ROOT / "docs" / "architecture.md"
_ORDER_SENTENCE = re.compile(r"Layers, bottom to top:\s*(?P<order>[^.]*)\.", re.S)


@dataclass(frozen=True)
class Import:
    """One import of a module of the package by a module of the package."""

    path: Path
    line: int
    source: str  # the importing module's unit: a subpackage, a bottom helper, or "" for the root modules
    target: str  # the imported unit, the same way
    imported: str  # the module imported (``lightning_svcca.name`` for ``from lightning_svcca import name``)
    type_checking: bool


def rank(unit: str, layers: Sequence[tuple[str, ...]] = LAYERS) -> int | None:
    """The layer index of a unit (-1: a bottom helper, ``len(layers)``: the root modules); ``None``: unknown."""
    if unit in BOTTOM_HELPERS:
        return -1
    if unit == "":
        return len(layers)
    for index, layer in enumerate(layers):
        if unit in layer:
            return index
    return None


def _unit_of_module(parts: Sequence[str], is_package: bool) -> str:
    """The unit of ``lightning_svcca.a.b``: ``a`` if it is a subpackage (or a helper), else ``""`` (the root)."""
    if len(parts) == 1:
        return ""
    if len(parts) == 2 and not is_package and parts[1] not in BOTTOM_HELPERS:
        return ""  # a root module: the compatibility modules
    return parts[1]


def _root_names(root: Path) -> dict[str, str]:
    """Names the root package hands out lazily (``_MODULES``: name -> submodule), read from its source."""
    tree = ast.parse((root / PACKAGE_NAME / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "_MODULES" for t in targets) and node.value is not None:
                names: dict[str, str] = {}
                for key, value in zip(node.value.keys, node.value.values, strict=True):  # type: ignore[attr-defined]
                    if key is None:  # ``**{name: "measures" for ...}``
                        for inner in ast.walk(value):
                            if isinstance(inner, ast.DictComp):
                                subpackage = ast.literal_eval(inner.value)
                                for element in ast.walk(inner.generators[0].iter):
                                    if isinstance(element, ast.Constant) and isinstance(element.value, str):
                                        names[element.value] = subpackage
                    else:
                        names[ast.literal_eval(key)] = ast.literal_eval(value)
                return names
    return {}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the statements under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for statement in node.body:
                    lines.update(range(statement.lineno, (statement.end_lineno or statement.lineno) + 1))
    return lines


def imports(root: Path = ROOT) -> Iterator[Import]:
    """Every import of the package by the package, under ``root`` (the folder holding ``lightning_svcca/``)."""
    lazy_names = _root_names(root)
    for path in sorted((root / PACKAGE_NAME).rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        source = _unit_of_module(parts, is_package=relative.name == "__init__" or len(parts) > 2)
        tree = ast.parse(path.read_text(), filename=str(path))
        guarded = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(alias.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: resolved against the importing module's package
                    package = list(parts if relative.name == "__init__" else parts[:-1])
                    module = ".".join([*package[: len(package) - node.level + 1], *filter(None, [module])])
                targets = [
                    (module, f"{module}.{alias.name}" if module == PACKAGE_NAME else module) for alias in node.names
                ]
            else:
                continue
            for module, written in targets:
                dotted = module.split(".")
                if dotted[0] != PACKAGE_NAME:
                    continue
                if len(dotted) == 1 and isinstance(node, ast.ImportFrom):  # ``from lightning_svcca import name``
                    name = written.rsplit(".", 1)[1]
                    if name in lazy_names:  # handed out by the root from a subpackage
                        target = lazy_names[name].split(".")[0]
                    elif (root / PACKAGE_NAME / f"{name}.py").exists() or (root / PACKAGE_NAME / name).is_dir():
                        target = _unit_of_module([PACKAGE_NAME, name], (root / PACKAGE_NAME / name).is_dir())
                    else:
                        continue  # a name the root defines itself (``__version__``)
                else:
                    is_package = (root.joinpath(*dotted) / "__init__.py").exists()
                    target = _unit_of_module(dotted, is_package or len(dotted) > 2)
                yield Import(path.relative_to(root), node.lineno, source, target, written, node.lineno in guarded)


def statements(root: Path = ROOT) -> list[Import]:
    """:func:`imports`, one per statement and imported unit (``from x import a, b`` once), in file and line order."""
    seen: dict[tuple[Path, int, str], Import] = {}
    for item in imports(root):
        seen.setdefault((item.path, item.line, item.target), item)
    return sorted(seen.values(), key=lambda item: (str(item.path), item.line, item.target))


def rule_broken(item: Import, layers: Sequence[tuple[str, ...]] = LAYERS) -> str | None:
    """Why ``item`` breaks the layering, or ``None`` when it points down (or stays within its subpackage)."""
    if item.source == item.target:
        return None
    source, target = rank(item.source, layers), rank(item.target, layers)
    if source is None or target is None:
        unknown = item.source if source is None else item.target
        return f"{unknown!r} is in no layer: add it to LAYERS and to docs/architecture.md's order"
    if target < source:
        return None
    below = [unit for layer in layers[: max(source, 0)] for unit in layer]
    allowed = f"{', '.join(below)} and itself" if below else "itself"
    where = "the package's root modules" if item.target == "" else f"{item.target!r} (layer {target})"
    return f"{item.source or 'the root'!r} (layer {source}) may import only {allowed}, not {where}"


def violations(root: Path = ROOT, layers: Sequence[tuple[str, ...]] = LAYERS) -> list[str]:
    """One line per import that points against the order: ``file:line imports name: rule``."""
    found = []
    for item in statements(root):
        broken = rule_broken(item, layers)
        if broken is not None:
            guard = " (under TYPE_CHECKING)" if item.type_checking else ""
            found.append(f"{item.path}:{item.line} imports {item.imported}{guard}: {broken}")
    return found


def graph(root: Path = ROOT, layers: Sequence[tuple[str, ...]] = LAYERS) -> str:
    """The import graph between units (``source -> target: count``), then the imports that point up."""
    counts = Counter(
        (item.source or "(root)", item.target or "(root)") for item in statements(root) if item.source != item.target
    )
    lines = [f"{source} -> {target}: {count}" for (source, target), count in sorted(counts.items())]
    broken = violations(root, layers)
    lines += ["", f"imports against the order {' <- '.join(' | '.join(layer) for layer in layers)}: {len(broken)}"]
    return "\n".join([*lines, *(f"  {line}" for line in broken)])


def documented_layers(text: str) -> tuple[tuple[str, ...], ...]:
    """The order stated in docs/architecture.md: "Layers, bottom to top: `a` <- `b` | `c` <- ...."."""
    match = _ORDER_SENTENCE.search(text)
    assert match, "docs/architecture.md states no 'Layers, bottom to top: ...' sentence"
    return tuple(tuple(re.findall(r"`(\w+)`", layer)) for layer in match["order"].split("<-"))


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_no_import_points_against_the_layers() -> None:
    broken = violations()
    assert not broken, "imports against the documented layers:\n" + "\n".join(broken)


def test_the_order_is_the_documented_one_and_covers_every_subpackage() -> None:
    assert documented_layers(ARCHITECTURE.read_text()) == LAYERS
    subpackages = {path.parent.name for path in (ROOT / PACKAGE_NAME).glob("*/__init__.py")}
    assert subpackages == {unit for layer in LAYERS for unit in layer}


def test_the_check_sees_function_level_type_checking_and_root_imports(tmp_path: Path) -> None:
    package = tmp_path / PACKAGE_NAME
    for folder in ("", "measures", "core", "pipeline", "monitoring", "cli"):
        (package / folder).mkdir(exist_ok=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text('__version__ = "0"\n_MODULES = {"Thing": "monitoring.thing"}\n')
    (package / "core" / "rows.py").write_text("from lightning_svcca.measures import x\n")
    (package / "pipeline" / "stage.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from lightning_svcca.core.rows import row\n"
        "if TYPE_CHECKING:\n"
        "    from lightning_svcca.monitoring.config import Config\n"
        "def f():\n"
        "    import lightning_svcca.monitoring.timeline\n"
        "from lightning_svcca import Thing\n"
        "from .. import callback\n"
    )
    (package / "callback.py").write_text("")
    (package / "cli" / "main.py").write_text("from lightning_svcca import __version__\n")
    found = violations(tmp_path)
    assert [line.split(" imports ")[0] for line in found] == [
        "lightning_svcca/pipeline/stage.py:4",
        "lightning_svcca/pipeline/stage.py:6",
        "lightning_svcca/pipeline/stage.py:7",
        "lightning_svcca/pipeline/stage.py:8",
    ]
    assert "(under TYPE_CHECKING)" in found[0]
    assert "'pipeline' (layer 2) may import only measures, core and itself, not 'monitoring' (layer 4)" in found[1]
    assert "not the package's root modules" in found[3]


if __name__ == "__main__":
    print(graph(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
