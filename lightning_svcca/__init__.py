"""lightning_svcca: watch each layer of a network converge while it trains, and freeze the ones that have.

The math (:func:`cca`, :func:`svcca`, :func:`pwcca`, :func:`linear_cka`) is plain torch; :class:`SVCCACallback`
(for ``pytorch_lightning``; ``lightning_svcca.lightning.SVCCACallback`` for ``lightning.pytorch``) runs it on a
probe batch every epoch and can freeze converged layers with a :class:`FreezePolicy`.
"""

from lightning_svcca.callback import SVCCACallback, SVCCAMonitorWarning
from lightning_svcca.freezing import FreezePolicy
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

__all__ = [
    "CCAResult",
    "Decomposition",
    "FreezePolicy",
    "SVCCACallback",
    "SVCCAMonitorWarning",
    "SimilarityWarning",
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
