"""The package's layout as docs/architecture.md describes it: subpackages by stage, every public import path of
earlier releases still working. (Size is ruff's to judge: complexity and argument limits in pyproject.toml.)"""

from __future__ import annotations

import importlib
from pathlib import Path

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


def test_every_stage_is_a_documented_subpackage() -> None:
    for name in SUBPACKAGES:
        module = importlib.import_module(f"lightning_svcca.{name}")
        assert module.__doc__ and len(module.__doc__.split()) > 10, f"{name}/__init__.py needs its paragraph"
    loose = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "_lazy", *COMPATIBILITY_MODULES_STEMS}
    assert not loose, f"modules outside the subpackages: {sorted(loose)}"


COMPATIBILITY_MODULES_STEMS = {name.rsplit(".", 1)[1] for name in COMPATIBILITY_MODULES}


def test_every_public_name_imports() -> None:
    for name in lightning_svcca.__all__:
        assert getattr(lightning_svcca, name) is not None
    for module_name, names in COMPATIBILITY_MODULES.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert getattr(module, name) is not None, f"{module_name}.{name}"
    from lightning_svcca.huggingface import SVCCATrainerCallback

    assert lightning_svcca.SVCCATrainerCallback is SVCCATrainerCallback  # imported on use; transformers is optional
    from lightning_svcca.similarity import __all__ as math_names

    assert set(math_names) >= {"cca", "svcca", "svcca_details", "pwcca", "linear_cka", "procrustes", "rbf_cka"}
