"""lightning_svcca: watch each layer of a network converge while it trains, and freeze the ones that have."""

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
