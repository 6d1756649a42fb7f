"""Input checks and the warnings and errors of the measures: what every measure refuses, and how it says so.

Shared by the measures of this package and by the pipeline, which checks its options with the same rules.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Literal

import torch
from numpy import bool_ as numpy_bool
from torch import Tensor

#: The SVCCA tutorial's advice: at least this many datapoints per kept direction, or CCA is biased upwards.
DATAPOINTS_PER_DIRECTION = 5

#: What SVCCA's ``keep`` fraction is a fraction of: the sum of singular values, or of their squares.
KeepBy = Literal["singular_values", "variance"]
_KEEP_BY = ("singular_values", "variance")
_COMPUTE_DTYPES = (torch.float32, torch.float64)


class SimilarityWarning(UserWarning):
    """Base class of the warnings this package emits, so users can filter them in one line."""


class TooFewDatapointsWarning(SimilarityWarning):
    """Too few datapoints for the number of kept directions: similarities are biased towards 1."""


class ZeroVarianceError(ValueError):
    """A representation has no variance (a dead or constant layer): there is nothing to correlate."""


def check_representation(x: object, name: str) -> Tensor:
    """Return ``x`` as a floating 2-D tensor with at least two datapoints and finite entries, or raise."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor (n_datapoints, n_features), got {type(x).__name__}") from err
    if x.is_complex():
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n_datapoints, n_features), got shape {tuple(x.shape)}; reduce conv or sequence"
            " outputs first, e.g. lightning_svcca.pipeline.reduction.reduce_output"
        )
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 datapoints (rows) to centre, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has no features (columns): shape {tuple(x.shape)}")
    return x


def check_pair(x: Tensor, y: Tensor) -> None:
    """Raise unless ``x`` and ``y`` describe the same datapoints on the same device."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of datapoints (rows), got {x.shape[0]} and {y.shape[0]}; rows are"
            " datapoints, columns are neurons (transpose google/svcca-style inputs)"
        )
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")


def check_dtype(dtype: torch.dtype) -> None:
    """Raise unless ``dtype`` is a compute precision the measures support (float32 or float64)."""
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")


def check_keep(keep: float | int, keep_by: str, *, stacklevel: int = 3) -> float | int:
    """Return ``keep`` as a Python float in (0, 1] or int >= 1 (numpy scalars accepted), or raise.

    ``keep=1`` (an int) keeps one direction, which is rarely meant (``keep=1.0`` keeps all): it warns.
    """
    if keep_by not in _KEEP_BY:
        raise ValueError(f"keep_by must be one of {_KEEP_BY}, got {keep_by!r}")
    if isinstance(keep, (bool, numpy_bool)) or not isinstance(keep, (numbers.Integral, numbers.Real)):
        raise TypeError(f"keep must be a float in (0, 1] or an int >= 1, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        keep = int(keep)
        if keep < 1:
            raise ValueError(f"keep as a number of directions must be >= 1, got {keep}")
        if keep == 1:
            warnings.warn(
                "keep=1 (an int) keeps a single direction; write keep=1.0 to keep all of them",
                SimilarityWarning,
                stacklevel=stacklevel,
            )
        return keep
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep as a fraction must be in (0, 1], got {keep}")
    return keep


def warn_if_few_datapoints(n: int, kept: int, measure: str, *, stacklevel: int) -> None:
    """Warn (:class:`TooFewDatapointsWarning`) when ``n`` is under the advised datapoints for ``kept`` directions."""
    recommended = DATAPOINTS_PER_DIRECTION * kept
    if n < recommended:
        warnings.warn(
            f"{measure} compares {kept} directions using only {n} datapoints; CCA is biased towards 1 with too few."
            f" Use at least {recommended} datapoints ({DATAPOINTS_PER_DIRECTION} per kept direction), e.g. a larger"
            " probe, more positions per sample, or fewer kept directions",
            TooFewDatapointsWarning,
            stacklevel=stacklevel,
        )


def zero_variance_message(name: str) -> str:
    """The :class:`ZeroVarianceError` message for representation ``name``, with the likely causes."""
    return (
        f"{name} has zero variance: every datapoint has the same activations (a dead or constant layer), or they"
        " differ only at the rounding level of their dtype (e.g. small variations on a large offset in float32:"
        " subtract the offset before casting, or pass float64), so there is nothing to correlate"
    )


def raise_if_not_finite(x: Tensor, name: str) -> None:
    """Raise a ValueError that locates the first NaN or Inf of ``x`` (the slow path of the check)."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        raise ValueError(f"{name} has values so large that their sum overflows {x.dtype}; rescale it first")
    bad = int((~finite).sum())
    row, col = (int(i) for i in (~finite).nonzero()[0])
    raise ValueError(
        f"{name} holds {bad} NaN or Inf value(s), the first at row {row}, column {col}; check the layer for"
        " overflow (e.g. under mixed precision) before comparing"
    )
