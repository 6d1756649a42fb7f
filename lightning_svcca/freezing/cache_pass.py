"""One forward pass through a prefix cache: what it does with the prefix (:class:`Pass`) and the short cuts.

:class:`~lightning_svcca.freezing.prefix_cache.PrefixCache` chooses a :class:`Pass` before each forward pass of the
model and keeps it in a :class:`ForwardPass`; the forwards patched onto the prefix's modules
(:func:`prefix_forward`) and onto the boundary (:func:`boundary_forward`) read it to return their input, the cached
outputs, or what they compute.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["ForwardPass", "Pass", "Role", "boundary_forward", "prefix_forward"]


class Pass(enum.Enum):
    """What one forward pass of the model does with the frozen prefix."""

    #: Not cached: the model runs untouched (eval mode, no gradients, no batch of tensors, cache off).
    OFF = "off"
    #: Some sample is not cached: the model runs in full and the boundary's new outputs are stored.
    FILL = "fill"
    #: Not cached here but every sample is in the cache below: the old prefix is skipped (its boundary returns the
    #: old outputs), the layers between the boundaries run, and their outputs move up into this cache.
    EXTEND = "extend"
    #: Every sample is cached but this batch is checked: it runs in full, then is compared with the cache.
    VERIFY = "verify"
    #: Every sample is cached: the prefix's modules return their input and the boundary the cached outputs.
    HIT = "hit"


class Role(enum.Enum):
    """Where an outermost prefix module sits relative to the cache below (it matters on an ``EXTEND`` pass)."""

    #: Above the old boundary (or no cache below): it runs on an ``EXTEND`` pass.
    OWN = "own"
    #: Below the old boundary: skipped on an ``EXTEND`` pass.
    BELOW = "below"
    #: The old boundary: returns the old cache's outputs on an ``EXTEND`` pass.
    OLD_BOUNDARY = "old_boundary"


@dataclass
class ForwardPass:
    """The forward pass in progress: its :class:`Pass` and what the patched forwards share."""

    kind: Pass = Pass.OFF
    keys: list[bytes] = field(default_factory=list)
    #: What the boundary returns (``HIT``), or the old boundary (``EXTEND``).
    served: Tensor | None = None
    #: The boundary's output computed in this pass (``FILL``, ``EXTEND``, ``VERIFY``).
    computed: Tensor | None = None
    #: Whether the boundary ran: later calls of the prefix's modules run as they are.
    boundary_done: bool = False
    #: The random state before a ``VERIFY`` pass, for its replay.
    rng_before: list[Tensor] | None = None


def prefix_forward(original: Callable[..., Any], role: Role, current: Callable[[], ForwardPass]) -> Callable[..., Any]:
    """A prefix module's forward: skipped on a ``HIT``, and on an ``EXTEND`` pass up to the old boundary.

    A skipped module returns its input; the old boundary on an ``EXTEND`` pass returns the old cache's outputs.

    Args:
        original: the module's own forward.
        role: where the module sits relative to the cache below.
        current: the forward pass in progress.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        state = current()
        if not state.boundary_done and state.kind is not Pass.OFF:
            if state.kind is Pass.HIT or (state.kind is Pass.EXTEND and role is Role.BELOW):
                return args[0] if args else next(iter(kwargs.values()), None)
            if state.kind is Pass.EXTEND and role is Role.OLD_BOUNDARY:
                return state.served
        return original(*args, **kwargs)

    return forward


def boundary_forward(
    original: Callable[..., Any], current: Callable[[], ForwardPass], refuse: Callable[[], None]
) -> Callable[..., Any]:
    """The boundary's forward: the cached outputs on a ``HIT``; otherwise computed, and kept for storing.

    Args:
        original: the boundary module's own forward.
        current: the forward pass in progress.
        refuse: called (after the pass is set ``OFF``) when the output is not one tensor row per sample.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        state = current()
        if state.kind is Pass.OFF or state.boundary_done:
            return original(*args, **kwargs)
        state.boundary_done = True
        if state.kind is Pass.HIT:
            return state.served
        output = original(*args, **kwargs)
        if not isinstance(output, Tensor) or output.ndim == 0 or output.shape[0] != len(state.keys):
            state.kind = Pass.OFF
            refuse()
            return output
        state.computed = output.detach()
        return output

    return forward
