"""Measuring past a frozen prefix: reuse the frozen layers' snapshots, and serve the probe from the prefix cache.

Once the lowest monitored layers are frozen and the frozen-prefix cache has verified that they compute a fixed
function of the model's input (:mod:`lightning_svcca.freezing.prefix_cache`), their probe activations cannot change: a
measurement reuses each such layer's last snapshot instead of recording and decomposing it again (it is still
compared with every reference, so it reads 1 against the previous epoch). When the probe's samples are cached too
(a probe drawn from the training data), the probe's forward pass skips the prefix as a cached training batch does.

Serving the probe is checked once per cache: the model's output on the first probe samples must be the same with
the prefix skipped as computed in full (eval mode, the probe's precision); a mismatch turns serving off for the fit,
with a warning. It stays off under DDP (each process caches only its own training samples) and when the probe
does not compute as training does (mixed precision, probe in full precision). What the recorder learns from the
prefix's modules (layouts, strided layers that shorten a sequence) comes from the full passes
(:class:`~lightning_svcca.pipeline.capture.Capture` keeps it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_svcca.core.safe_files import stored_snapshot
from lightning_svcca.freezing.freezer import Freezer
from lightning_svcca.freezing.prefix_cache import PrefixCache
from lightning_svcca.pipeline.capture import Capture, WarnFn
from lightning_svcca.pipeline.recording import ActivationRecorder
from lightning_svcca.pipeline.snapshot import Collective, Snapshot
from lightning_svcca.pipeline.store import SnapshotStore

__all__ = ["FrozenPrefix"]

#: Probe samples whose output is compared, served against computed, before a cache serves the probe.
CHECK_SAMPLES = 64


class FrozenPrefix:
    """Per measurement: which layers are known, and the probe pass for the others.

    Args:
        capture: the run's probe passes and snapshots.
        store: the snapshots by ``(layer, point)``.
        freezer: the freezes and their prefix cache.
        collective: every process of the run (the layers reused must be the same everywhere).
        warn_once: for a probe the cache cannot serve.
        serve_probe: whether the probe may be served at all: ``False`` when it does not compute as training does
            (a full-precision probe of a mixed-precision run: the cached outputs are not what it would compute).
    """

    def __init__(
        self,
        capture: Capture,
        store: SnapshotStore,
        freezer: Freezer,
        collective: Collective,
        warn_once: WarnFn,
        *,
        serve_probe: bool = True,
    ) -> None:
        self.capture = capture
        self.serve_probe = serve_probe
        self.store = store
        self.freezer = freezer
        self.collective = collective
        self._warn_once = warn_once
        #: The modules in the order they finished, from the last pass that ran the whole model (a served pass
        #: skips the prefix's modules, and freezing needs the full order).
        self.completion: list[str] = []
        #: Probe passes that skipped the prefix.
        self.served_passes = 0
        #: The cache whose served probe matched the full pass, and one that holds none of the probe.
        self._checked: PrefixCache | None = None
        self._not_cached: PrefixCache | None = None
        self._serving_refused = False

    def known_layers(self, layers: Sequence[str], last_point: int | None, device: torch.device) -> list[str]:
        """The layers whose snapshot at ``last_point`` still holds, on every process (``[]`` for none)."""
        fixed = set(self.freezer.cached_layers()) if last_point is not None else set()
        local = [float(layer in fixed and (layer, str(last_point)) in self.store) for layer in layers]
        agreed = self.collective.sum(torch.tensor(local, device=device)).tolist()
        return [layer for layer, count in zip(layers, agreed, strict=True) if count >= self.collective.world_size]

    def reused(self, layers: Sequence[str], last_point: int) -> dict[str, Snapshot]:
        """The snapshots of ``layers`` at ``last_point`` (the same objects: nothing is copied)."""
        found = {layer: stored_snapshot(self.store, (layer, str(last_point))) for layer in layers}
        return {layer: snapshot for layer, snapshot in found.items() if snapshot is not None}  # unreadable: skipped

    def record(self, model: nn.Module, device: torch.device, known: Sequence[str]) -> ActivationRecorder:
        """Probe activations of the monitored layers but ``known``; through the cache when it may serve."""
        cache = self.freezer.cache
        serve = (
            cache is not None
            and bool(known)
            and set(self.freezer.cached_layers()) <= set(known)  # a layer in the skipped prefix must be known
            and self._may_serve(model, device)
        )
        if serve:
            assert cache is not None
            try:
                with cache.serving_probe():
                    recorder = self.capture.record(model, device, skip=known, monitored=True)
                self.served_passes += 1
                return recorder
            except ValueError as error:  # a forward pass that failed when served: measure in full instead
                self._refuse(
                    f"the probe's forward pass failed with the prefix up to {cache.boundary!r} served ({error})"
                )
        recorder = self.capture.record(model, device, skip=known, monitored=True)
        self.completion = recorder.completion
        return recorder

    def _may_serve(self, model: nn.Module, device: torch.device) -> bool:
        """Whether the probe may be served from the cache: allowed here, and checked once against the full pass."""
        cache = self.freezer.cache
        if cache is None or not self.serve_probe or self._serving_refused or self.collective.world_size > 1:
            return False
        if not self.completion:  # no full pass yet (after a resume): freezing needs its module order first
            return False
        if self._checked is cache:
            return True
        if self._not_cached is cache:
            return False
        matches = cache.probe_matches(lambda: self.capture.outputs(model, device, CHECK_SAMPLES))
        if matches is None:
            self._not_cached = cache  # the probe is not training data: it runs in full (not tried again)
            return False
        if not matches:
            self._refuse(
                f"the probe's output changes (or its forward pass fails) when the frozen prefix up to"
                f" {cache.boundary!r} is served from the cache: the prefix computes differently in eval mode or in"
                " the probe's precision"
            )
            return False
        self._checked = cache
        return True

    def _refuse(self, reason: str) -> None:
        """Serve the probe no more in this fit, and say why."""
        self._serving_refused = True
        self._warn_once(
            "probe-not-served",
            f"{reason}. The probe runs in full through the prefix for the rest of the fit; training still uses the"
            " cache",
        )
