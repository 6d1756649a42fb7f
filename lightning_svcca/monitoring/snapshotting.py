"""The snapshot and store steps of a measurement: from a recorded probe pass to snapshots kept by point.

:class:`Snapshotter` turns a probe pass (:class:`~lightning_svcca.pipeline.recording.ActivationRecorder`) into one
:class:`~lightning_svcca.pipeline.snapshot.Snapshot` per layer, reusing those of a verified frozen prefix, and keeps
them in the run's :class:`~lightning_svcca.pipeline.store.SnapshotStore` under ``(layer, str(point))``. It
also fixes the monitored layers' bottom-up order at the first pass, snapshots the fixed references once (under
``(layer, name)``), and offers each pass to the cross-layer moments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from lightning_svcca.monitoring.config import MonitorConfig
from lightning_svcca.pipeline.capture import LEAVE_OUT_BELOW, Capture, WarnFn, unpaired_rows
from lightning_svcca.pipeline.layers import LayerSpec
from lightning_svcca.pipeline.moments import CrossLayerMoments
from lightning_svcca.pipeline.recording import ActivationRecorder
from lightning_svcca.pipeline.references import Reference, device_of, reference_model
from lightning_svcca.pipeline.snapshot import Snapshot
from lightning_svcca.pipeline.store import SnapshotStore

__all__ = ["Snapshotter"]


class Snapshotter:
    """Snapshots of the monitored layers, of the fixed references and for the cross-layer maps, for one run.

    Args:
        model: the model being trained.
        specs: the monitored layers as resolved from the options.
        config: the monitor's options: whether the user named the layers (then a layer that never runs is warned
            about), and the references (the fixed ones are snapshotted once).
        store: where snapshots are kept.
        cross_layer: the moments kept for cross-layer maps, or ``None``.
        warn_once: the monitor's once-per-key warning.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Sequence[LayerSpec],
        config: MonitorConfig,
        store: SnapshotStore,
        cross_layer: CrossLayerMoments | None,
        *,
        warn_once: WarnFn,
        log: Callable[..., None] = lambda *args: None,
    ) -> None:
        self.model = model
        self._log = log
        self.specs = list(specs)
        self.named = config.layers is not None
        self.references: list[Reference] = list(config.references)
        self.store = store
        self.cross_layer = cross_layer
        self._warn_once = warn_once
        #: The monitored layers that ran, bottom-up, from the first probe pass (``[]`` before it).
        self.layer_order: list[str] = []
        #: The layer order of the checkpoint this run resumed from (``[]`` for a new run).
        self.resumed_order: list[str] = []
        #: The run's probe passes (given by :meth:`attach` once the probe exists).
        self.capture: Capture | None = None

    @property
    def layers(self) -> list[str]:
        """Monitored layers in bottom-up (forward) order, known after the first probe."""
        return list(self.layer_order) or [spec.name for spec in self.specs]

    def attach(self, capture: Capture) -> None:
        """Take the run's probe passes."""
        self.capture = capture

    def resume_layers(self, order: Sequence[str]) -> None:
        """Take a checkpoint's layer order; when the monitored layers changed, the next probe settles it again.

        Layers are matched by name: kept ones keep their rows and snapshots, new ones start at the next
        measurement, removed ones keep their rows in the history (a note says which, :meth:`settle_layer_order`).
        """
        self.resumed_order = list(order)
        same = set(order) == {spec.name for spec in self.specs}
        self.layer_order = list(order) if same or not order else []

    def settle_layer_order(self, order: Sequence[str]) -> list[str]:
        """Bottom-up order from the first probe; layers that did not run are dropped with a warning."""
        if not self.layer_order:
            monitored = {spec.name for spec in self.specs}
            ran = [name for name in order if name in monitored]
            missing = [spec.name for spec in self.specs if spec.name not in ran]
            if missing and self.named:
                self._warn_once(
                    "did-not-run",
                    f"layers {missing} did not run in the probe's forward pass and are not monitored; check the"
                    " names, probe_input or forward_fn",
                )
            if not ran:
                raise RuntimeError(
                    "none of the monitored layers ran in the probe's forward pass: check layers, probe_input and"
                    " forward_fn (the default calls model(probe_input))"
                )
            self.layer_order = ran
            self._note_resumed_layers()
        return self.layer_order

    def _note_resumed_layers(self) -> None:
        """After a resume with other layers: which are new and which only keep their earlier rows."""
        before = self.resumed_order
        added = [layer for layer in self.layer_order if layer not in before]
        removed = [layer for layer in before if layer not in self.layer_order]
        if before and (added or removed):
            self._warn_once(
                "resumed-layers",
                f"resumed with other layers than the checkpoint's {before}: new layers {added} start their history"
                f" at this measurement (no earlier epochs to compare with); layers no longer monitored {removed}"
                " keep their earlier rows (and freezes) in the history; the other layers continue as before",
            )

    def take(
        self, recorder: ActivationRecorder, reused: Mapping[str, Snapshot], epoch: int, *, first: bool = False
    ) -> dict[str, Snapshot]:
        """Each layer's snapshot, in layer order: decomposed from ``recorder``, or the one in ``reused``.

        At the ``first`` measurement, default layers too wide for the probe are left out (:meth:`leave_out_thin`).
        """
        assert self.capture is not None
        layers = self.settle_layer_order(recorder.order)
        measured = [layer for layer in layers if layer not in reused]
        recorded = self.capture.snapshots(
            recorder,
            measured,
            epoch,
            device_of(self.model),
            label=f"epoch {epoch}",
            leave_out_thin=first and not self.named,
        )
        if first and self.capture.left_out:
            layers = self.leave_out_thin()
        return {
            layer: reused[layer] if layer in reused else recorded[layer]
            for layer in layers
            if layer in reused or layer in recorded
        }

    def leave_out_thin(self) -> list[str]:
        """Default layers too wide for the probe (:attr:`Capture.left_out`) are no longer monitored: one log line."""
        assert self.capture is not None
        left_out = self.capture.left_out
        self.layer_order = [layer for layer in self.layer_order if layer not in left_out]
        self._log(
            "SVCCA leaves %s out of the default layers: fewer than %d probe datapoints per kept direction bias"
            " similarities towards 1 (raise probe_size or max_datapoints, or name layers to monitor them anyway)",
            ", ".join(f"{layer!r} ({why})" for layer, why in left_out.items()),
            LEAVE_OUT_BELOW,
        )
        return self.layer_order

    def keep(
        self, point: int, snapshots: Mapping[str, Snapshot], reused: Mapping[str, Snapshot], last: int | None
    ) -> None:
        """Store each snapshot under ``(layer, point)``; a reused one as an alias of its ``last`` point's (no copy)."""
        for layer, snapshot in snapshots.items():
            if layer in reused:
                self.store.alias((layer, str(point)), (layer, str(last)))
            else:
                self.store.put((layer, str(point)), snapshot)

    def keep_moment(self, recorder: ActivationRecorder, point: int, epoch: int, step: int, total: int | None) -> None:
        """Offer a pass to the cross-layer moments (kept when it reaches one of their fractions of ``total``)."""
        if self.cross_layer is not None:
            self.cross_layer.observe(point, epoch, step, self._pooled(recorder, self.layers), total)

    def fixed_references(self, recorder: ActivationRecorder | None = None) -> None:
        """Snapshot each fixed reference once per layer (restored from checkpoints afterwards).

        ``recorder``: the monitored model's pass, when one was just made (feature references are laid out by it).
        """
        assert self.capture is not None
        device = device_of(self.model)
        layers = self.layers
        for reference in self.references:
            if not reference.fixed or all((layer, reference.name) in self.store for layer in layers):
                continue
            snapshots: dict[str, Snapshot]
            if not reference.kind.needs_model_pass:  # features
                if recorder is None:
                    recorder = self.capture.record(self.model, device, monitored=True)
                snapshots = self.capture.feature_snapshots(reference.name, reference.source, recorder, layers)
            else:
                label = f"reference {reference.name!r}"
                with reference_model(reference, self.model) as model:
                    reference_recorder = self.capture.record(model, device, label=label)
                if self.cross_layer is not None and reference.name == self.cross_layer.reference:
                    self.cross_layer.set_reference(self._pooled(reference_recorder, layers))
                snapshots = self.capture.snapshots(reference_recorder, layers, 0, device, label=label)
            for layer, snapshot in snapshots.items():
                self.store.put((layer, reference.name), snapshot)

    def _pooled(self, recorder: ActivationRecorder, layers: Sequence[str]) -> dict[str, Tensor]:
        """Each layer's output averaged over its positions (one datapoint per sample), every process's gathered.

        A layer that ran on part of the probe only is left out (its means are not one per probe sample).
        """
        assert self.capture is not None
        return {
            layer: self.capture.collective.gather_rows(recorder.means[layer]).float().cpu()
            for layer in layers
            if layer in recorder.means and unpaired_rows(recorder, layer) is None
        }
