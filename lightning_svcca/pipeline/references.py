"""References: what a layer is compared with, and how fixed references are turned into activations.

A reference is a point in time of the same model (``"previous"``, ``"initial"``, ``"final"``, or a lag used by a
freeze policy) or something fixed: a model (``nn.Module``), a checkpoint path (the model itself with the
checkpoint's weights), or a tensor of features aligned with the probe's samples. :class:`ReferenceKind` says which,
and what comparing with each kind takes; every stage asks it instead of testing kind names.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_svcca.core.rows import LAYER_FACTS
from lightning_svcca.pipeline.wrappers import modules_by_name

__all__ = [
    "TIME_REFERENCES",
    "Reference",
    "ReferenceKind",
    "check_reference_layers",
    "device_of",
    "parse_references",
    "reference_model",
]


class ReferenceKind(str, Enum):
    """What a reference is, and what comparing with it takes: the one place that knows the kinds.

    ========== ====================================================== ===== ========== ===========
    kind       compared with                                          fixed model pass from a point
    ========== ====================================================== ===== ========== ===========
    previous   the last measured point                                                 yes
    initial    the first measured point                                                yes
    lag        a point a lag back (a freeze policy's ``lag..``)                        yes
    final      the last point, at the end of fit (and live, charted)
    module     an ``nn.Module``'s activations, snapshotted once       yes   yes
    checkpoint the model with a checkpoint's weights, once            yes   yes
    tensor     features aligned with the probe's samples, once        yes
    ========== ====================================================== ===== ========== ===========

    A ``str`` enum: a kind equals its name (``ReferenceKind.LAG == "lag"``).
    """

    PREVIOUS = "previous"
    INITIAL = "initial"
    FINAL = "final"
    LAG = "lag"
    MODULE = "module"
    CHECKPOINT = "checkpoint"
    TENSOR = "tensor"

    def __str__(self) -> str:
        return self.value

    @property
    def named(self) -> bool:
        """A reference the user gives by its name (``"previous"``, ``"initial"``, ``"final"``)."""
        return self in (ReferenceKind.PREVIOUS, ReferenceKind.INITIAL, ReferenceKind.FINAL)

    @property
    def fixed(self) -> bool:
        """Something outside the run's own time (a model, a checkpoint, features): snapshotted once, by name."""
        return self in (ReferenceKind.MODULE, ReferenceKind.CHECKPOINT, ReferenceKind.TENSOR)

    @property
    def needs_model_pass(self) -> bool:
        """Its snapshots take a probe pass through another model (or the model with other weights)."""
        return self in (ReferenceKind.MODULE, ReferenceKind.CHECKPOINT)

    @property
    def from_point(self) -> bool:
        """Compared at each measurement with an earlier measured point of this run (gone when the probe changes)."""
        return self in (ReferenceKind.PREVIOUS, ReferenceKind.INITIAL, ReferenceKind.LAG)

    @property
    def charted(self) -> bool:
        """Its history rows are drawn as a heatmap at each measurement.

        ``final`` is drawn from its own pass; a freeze policy's lag is only logged.
        """
        return self not in (ReferenceKind.FINAL, ReferenceKind.LAG)


TIME_REFERENCES = tuple(kind.value for kind in ReferenceKind if kind.named)
RESERVED_NAMES = (*TIME_REFERENCES, *LAYER_FACTS, "heatmap")


@dataclass(frozen=True)
class Reference:
    """One reference: a point in time of the same model, or something fixed (a model, a checkpoint, features).

    ``kind`` may be given as its name (``Reference("lag5", "lag", lag=5)``); it is kept as a :class:`ReferenceKind`.
    """

    name: str
    kind: ReferenceKind
    source: Any = None
    lag: int = 0
    #: A lag that grows with the run (``kind="lag"``): this fraction of the measurements so far.
    fraction: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ReferenceKind(self.kind))

    @property
    def fixed(self) -> bool:
        """A model, checkpoint or tensor rather than a point in the run's own time."""
        return self.kind.fixed


def parse_references(reference: Any) -> list[Reference]:
    """Normalise the ``reference`` argument (names, modules, paths, tensors, or a dict of named ones)."""
    if isinstance(reference, (str, nn.Module, Tensor, Path)):
        items: list[tuple[str | None, Any]] = [(None, reference)]
    elif isinstance(reference, Mapping):
        items = [(str(name), value) for name, value in reference.items()]
    elif isinstance(reference, Sequence):
        items = []
        for item in reference:
            items.extend(
                (name, value) for name, value in (item.items() if isinstance(item, Mapping) else [(None, item)])
            )
    else:
        raise TypeError(
            "reference must be a name, a module, a checkpoint path, a tensor, or a list or dict of them; got"
            f" {type(reference).__name__}"
        )
    parsed: list[Reference] = []
    for name, value in items:
        if isinstance(value, str) and value in TIME_REFERENCES and name is None:
            parsed.append(Reference(value, ReferenceKind(value)))
            continue
        kind: ReferenceKind | None = None
        if isinstance(value, nn.Module):
            kind = ReferenceKind.MODULE
        elif isinstance(value, Tensor):
            kind = ReferenceKind.TENSOR
        elif isinstance(value, (str, Path)):
            _check_not_a_misspelt_name(value)
            kind = ReferenceKind.CHECKPOINT
        if kind is None:
            raise TypeError(
                f"reference {value!r}: expected 'previous', 'initial', 'final', an nn.Module, a checkpoint path or a"
                " tensor"
            )
        if kind is ReferenceKind.TENSOR and value.ndim < 1:
            raise ValueError("a tensor reference needs one row per probe sample")
        source = value.detach().cpu() if kind is ReferenceKind.TENSOR else value
        parsed.append(Reference(name or "reference", kind, source))
    names = [ref.name for ref in parsed]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"reference names must be unique, got {duplicates} twice; name fixed references with a dict")
    for ref in parsed:
        if ref.fixed and (ref.name in RESERVED_NAMES or ref.name.isdigit() or ref.name.startswith("lag")):
            raise ValueError(
                f"{ref.name!r} cannot name a fixed reference: it is reserved for {RESERVED_NAMES} and epochs"
            )
        if "/" in ref.name or "@" in ref.name:
            raise ValueError(f"reference name {ref.name!r} may not contain '/' or '@' (it is part of tags and keys)")
    if not parsed:
        raise ValueError("reference is empty: give at least one of 'previous', 'initial', 'final' or a fixed reference")
    return parsed


def _check_not_a_misspelt_name(value: str | Path) -> None:
    """A string that is no file but close to a reference name is a typo, not a checkpoint path."""
    text = str(value)
    if Path(text).exists():
        return
    close = difflib.get_close_matches(text.lower(), TIME_REFERENCES, n=1, cutoff=0.6)
    if close:
        raise ValueError(
            f"reference {text!r} is neither one of {TIME_REFERENCES} nor an existing checkpoint file; did you mean"
            f" {close[0]!r}?"
        )


def check_reference_layers(reference: Reference, layers: Sequence[str]) -> None:
    """Raise unless a module reference has every monitored layer (matched by name)."""
    known = set(modules_by_name(reference.source))
    missing = [layer for layer in layers if layer not in known]
    if missing:
        raise ValueError(
            f"reference {reference.name!r} ({type(reference.source).__name__}) has no modules named {missing}; layers"
            " are matched by name, so give a reference with the same structure (e.g. a copy of the model before"
            " fine-tuning, or a checkpoint of it)"
        )


@contextlib.contextmanager
def reference_model(reference: Reference, pl_module: nn.Module) -> Iterator[nn.Module]:
    """The model to probe for a fixed reference.

    A module reference runs on the model's device (and goes back afterwards), as a copy in the model's floating
    dtype when the two differ (a float32 pretrained model beside a ``bf16-true`` or ``64-true`` one, whose probe
    inputs are cast to that dtype); a checkpoint reference is the model itself with the checkpoint's weights
    loaded for the duration, restored bit for bit afterwards.
    """
    device = device_of(pl_module)
    if reference.kind is ReferenceKind.MODULE:
        module: nn.Module = reference.source
        dtype = _floating_dtype(pl_module)
        if dtype is not None and _floating_dtype(module) not in (None, dtype):
            yield copy.deepcopy(module).to(device=device, dtype=dtype)
            return
        original = next((p.device for p in module.parameters()), device)
        module.to(device)
        try:
            yield module
        finally:
            module.to(original)
        return
    weights = _load_checkpoint_weights(reference)
    saved = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
    _load_reference_weights(pl_module, weights, reference)
    try:
        yield pl_module
    finally:
        pl_module.load_state_dict(saved)


def _load_checkpoint_weights(reference: Reference) -> dict[str, Tensor]:
    try:
        checkpoint = torch.load(reference.source, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"reference {reference.name!r}: cannot load {reference.source} with weights_only=True ({error}). Save"
            " the weights alone (torch.save(model.state_dict(), path)) or pass the module itself"
        ) from error
    weights = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise ValueError(f"reference {reference.name!r}: {reference.source} holds no state_dict of tensors")
    return dict(weights)


def _load_reference_weights(pl_module: nn.Module, weights: Mapping[str, Tensor], reference: Reference) -> None:
    own = pl_module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    mismatched = [
        f"{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in weights and weights[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"reference {reference.name!r} ({reference.source}) does not match the model: missing keys {missing[:8]},"
            f" unexpected keys {unexpected[:8]}, shape mismatches {mismatched[:8]}. A checkpoint reference must come"
            " from the same architecture"
        )
    pl_module.load_state_dict(weights)


def device_of(module: nn.Module) -> torch.device:
    """The device a module computes on (a LightningModule's ``device``, else its first parameter's)."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter (``None`` without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
