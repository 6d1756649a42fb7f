"""The mathematics, pure torch: representation similarity measures and what they share.

A representation is a ``(datapoints, features)`` matrix. Each measure (CCA, SVCCA, PWCCA, linear / debiased / RBF
CKA, Procrustes, R2-CCA, the held-out CCA family, and the sample-level mutual k-NN, CKNNA, minibatch CKA and RSA)
compares two of them; :func:`decompose` is the one decomposition (the SVD basis of a centred matrix, with a rank
cut at the data's own rounding level) that every measure and the training-time snapshots are built on. Nothing
here knows about models, probes or training.
"""

from lightning_svcca.measures._checks import (
    DATAPOINTS_PER_DIRECTION,
    SimilarityWarning,
    TooFewDatapointsWarning,
    ZeroVarianceError,
)
from lightning_svcca.measures.cca import CCAResult, cca, pwcca, r2cca, svcca, svcca_details
from lightning_svcca.measures.cka import linear_cka, procrustes, rbf_cka
from lightning_svcca.measures.decomposition import Decomposition, decompose
from lightning_svcca.measures.minibatch import MinibatchCKA, minibatch_cka
from lightning_svcca.measures.neighbors import cknna, mutual_knn
from lightning_svcca.measures.rsa import rsa

__all__ = [
    "DATAPOINTS_PER_DIRECTION",
    "CCAResult",
    "Decomposition",
    "MinibatchCKA",
    "SimilarityWarning",
    "TooFewDatapointsWarning",
    "ZeroVarianceError",
    "cca",
    "cknna",
    "decompose",
    "linear_cka",
    "minibatch_cka",
    "mutual_knn",
    "procrustes",
    "pwcca",
    "r2cca",
    "rbf_cka",
    "rsa",
    "svcca",
    "svcca_details",
]
