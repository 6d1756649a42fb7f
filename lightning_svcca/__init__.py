"""lightning_svcca: watch each layer of a network converge while it trains, and freeze the ones that have.

The math (:func:`cca`, :func:`svcca`, :func:`pwcca`, :func:`linear_cka`) is plain torch; :class:`SVCCAMonitor`
runs it on a probe batch from any training loop; :class:`SVCCACallback` (for ``pytorch_lightning``;
``lightning_svcca.lightning.SVCCACallback`` for ``lightning.pytorch``) is the Lightning callback around it, and
``lightning_svcca.huggingface.SVCCATrainerCallback`` the HuggingFace ``Trainer`` one. Converged layers can be
frozen with a :class:`FreezePolicy`.

Importing the package loads torch and numpy only: Lightning, TensorBoard and matplotlib are imported when a
callback, a writer or a heatmap needs them.
"""

from typing import TYPE_CHECKING, Any

from lightning_svcca.freezing import FreezePolicy
from lightning_svcca.monitor import Runtime, SVCCAMonitor, SVCCAMonitorWarning
from lightning_svcca.similarity import (
    CCAResult,
    Decomposition,
    SimilarityWarning,
    TooFewDatapointsWarning,
    ZeroVarianceError,
    cca,
    decompose,
    linear_cka,
    pwcca,
    svcca,
    svcca_details,
)
from lightning_svcca.writers import TensorBoardWriter

if TYPE_CHECKING:
    from lightning_svcca.callback import SVCCACallback

__all__ = [
    "CCAResult",
    "Decomposition",
    "FreezePolicy",
    "Runtime",
    "SVCCACallback",
    "SVCCAMonitor",
    "SVCCAMonitorWarning",
    "SimilarityWarning",
    "TensorBoardWriter",
    "TooFewDatapointsWarning",
    "ZeroVarianceError",
    "cca",
    "decompose",
    "linear_cka",
    "pwcca",
    "svcca",
    "svcca_details",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``SVCCACallback`` imports pytorch_lightning, so it is loaded on first use only."""
    if name == "SVCCACallback":
        from lightning_svcca.callback import SVCCACallback

        return SVCCACallback
    raise AttributeError(f"module 'lightning_svcca' has no attribute {name!r}")
