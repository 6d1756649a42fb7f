"""SVCCAMonitor: the whole measurement pipeline, with no training framework attached.

probe -> activations -> snapshots -> comparisons -> history -> outputs. The monitor orchestrates; each stage is a
collaborator. A training loop calls :meth:`~SVCCAMonitor.start` before its first step, :meth:`~SVCCAMonitor.measure`
after training steps and :meth:`~SVCCAMonitor.finish` at the end; the Lightning callback and the HuggingFace
``TrainerCallback`` are such loops. One measurement, in order (:meth:`SVCCAMonitor._measure`):

1. record: the probe batch through the model, past a verified frozen prefix
   (:class:`~lightning_svcca.monitoring.freeze_coordinator.FreezingCoordinator`,
   :mod:`~lightning_svcca.pipeline.capture`);
2. snapshot: each layer compressed, or a frozen layer's last snapshot reused; the cross-layer moments and, at the
   first measurement, the fixed references;
3. compare: each snapshot against the references (:class:`~lightning_svcca.pipeline.comparisons.Comparisons`);
4. store: the snapshots kept by point (:class:`~lightning_svcca.pipeline.store.SnapshotStore`), the point
   added to the run's :class:`~lightning_svcca.core.timeline.Timeline`;
5. freeze: converged layers frozen on every process (the freezing coordinator);
6. report: rows into :attr:`SVCCAMonitor.history`, the writers and the history CSV
   (:class:`~lightning_svcca.monitoring.outputs.RunOutputs`).

What the monitor needs from a framework (collectives, which process is rank zero, a precision context, what to do
after a freeze) comes in a :class:`~lightning_svcca.monitoring.runtime.Runtime`.

Example:
    >>> import torch
    >>> from torch import Tensor, nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> monitor = SVCCAMonitor(model, probe=torch.randn(64, 4), layers=["0", "2"], baseline=False)
    >>> monitor.start()
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(2.0)  # a "training step" that only rescales: SVCCA stays 1
    >>> rows = monitor.measure(epoch=1, step=1)
    >>> round(next(r["value"] for r in rows if r["reference"] == "previous" and r["layer"] == "0"), 6)
    1.0
    >>> monitor.close()
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from lightning_svcca.core.timeline import Timeline
from lightning_svcca.freezing.policy import FreezePolicy
from lightning_svcca.measures import SimilarityWarning
from lightning_svcca.monitoring import preflight
from lightning_svcca.monitoring import state as monitor_state
from lightning_svcca.monitoring.budget import CostWatch, planned_measurements, run_length
from lightning_svcca.monitoring.config import (
    LayersArg,
    MetricsArg,
    MonitorConfig,
    MonitorOptions,
    ProbeArg,
    ReferenceArg,
)
from lightning_svcca.monitoring.freeze_coordinator import FreezingCoordinator
from lightning_svcca.monitoring.options import monitor_config, takes_monitor_options
from lightning_svcca.monitoring.outputs import RunOutputs
from lightning_svcca.monitoring.runtime import Runtime
from lightning_svcca.monitoring.snapshotting import Snapshotter
from lightning_svcca.output.writers import as_writers
from lightning_svcca.pipeline.comparisons import Comparisons
from lightning_svcca.pipeline.layers import LayerSpec, format_layers, resolve_layers
from lightning_svcca.pipeline.moments import CrossLayerMoments
from lightning_svcca.pipeline.probe import Probe
from lightning_svcca.pipeline.references import device_of
from lightning_svcca.pipeline.store import SnapshotStore
from lightning_svcca.pipeline.wrappers import unwrap_model, wrapper_precision

__all__ = ["Runtime", "SVCCAMonitor", "SVCCAMonitorWarning"]


class SVCCAMonitorWarning(SimilarityWarning):
    """A recoverable problem of the monitor (a skipped layer, a small probe); training goes on."""


@takes_monitor_options()
class SVCCAMonitor:
    """Measure how each layer's representation changes while a model trains, in any training loop.

    Build it from the model and a probe, call :meth:`start` before the first training step, :meth:`measure` after
    each epoch (or every k steps), :meth:`finish` at the end, and :meth:`close` when done (or use it as a context
    manager). Every value lands in :attr:`history`; with ``writers`` (a ``SummaryWriter``, Lightning loggers) and
    ``log_dir`` (``svcca_history.csv``) they are written out too. :meth:`state_dict` is a flat, versioned dict.

    Every option of :class:`~lightning_svcca.monitoring.config.MonitorConfig` is an argument (the first six also by
    position, after ``model``).

    Args:
        model: the model being trained.
        probe: a tensor (the model input), a batch (tuple, list or dict of tensors), a DataLoader (``probe_size``
            samples drawn at random with ``probe_seed``; an iterable dataset's first ones), or a function returning
            one of those (called at :meth:`start`).
        writers: where scalars, heatmaps and freeze events go: ``None``, a ``SummaryWriter``, a Lightning logger,
            anything with ``log_metrics(metrics, step)``, or a list of them.
        log_dir: where ``svcca_history.csv`` (and spilled snapshots) go; ``None``: no file, spills in the working
            directory.
        runtime: what the framework provides (collectives, rank, precision context, after-freeze hook).

    """

    def __init__(  # noqa: PLR0917 - the model, then the six options callers have always given by position
        self,
        model: nn.Module,
        probe: ProbeArg = None,
        layers: LayersArg = None,
        reference: ReferenceArg = ("previous", "final"),
        metrics: MetricsArg = ("svcca",),
        every_n_epochs: int | None = 1,
        freeze: FreezePolicy | None = None,
        *,
        writers: Any = None,
        log_dir: str | Path | None = None,
        runtime: Runtime | None = None,
        **options: Unpack[MonitorOptions],
    ) -> None:
        config = monitor_config(type(self), probe, layers, reference, metrics, every_n_epochs, freeze, **options)
        self._init(model, config, writers=writers, log_dir=log_dir, runtime=runtime)

    @classmethod
    def from_config(cls, model: nn.Module, config: MonitorConfig, **outputs: Any) -> SVCCAMonitor:
        """A monitor from a checked :class:`MonitorConfig` (the callbacks'); ``writers``, ``log_dir``, ``runtime``."""
        monitor = cls.__new__(cls)
        monitor._init(model, config, **outputs)
        return monitor

    def _init(
        self, model: nn.Module, config: MonitorConfig, *, writers: Any = None, log_dir: Any = None, runtime: Any = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = unwrap_model(model)  # torch.compile, Fabric, DDP: the probe runs through the module itself
        self.config = config
        self.runtime = runtime or Runtime(**wrapper_precision(model))
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.writers = as_writers(writers)
        self.specs: list[LayerSpec] = resolve_layers(self.model, config.layers, config.reduction)
        preflight.check_against_model(config, self.specs)
        self._warned: set[str] = set()
        #: Every measured value: dicts with keys epoch, layer, reference, metric, value.
        self.history: list[dict[str, Any]] = []
        #: Layers skipped at some epoch: (epoch, layer, reason).
        self.skipped: list[tuple[int, str, str]] = []
        #: Seconds each measurement took, by point (probe, snapshots, comparisons, outputs).
        self.timings: dict[int, float] = {}
        #: Seconds of each measurement's probe pass (the forward pass with hooks), by point.
        self.probe_timings: dict[int, float] = {}
        #: The measured points, in order, with each one's (epoch, step); the comparisons read the same object.
        self.timeline = Timeline(lag_in_measurements=self.by_step)
        #: Layers kept at moments of the run for cross-layer maps (``cross_layer=...``), or ``None``.
        self.cross_layer = CrossLayerMoments.for_config(config)
        #: The cross-layer maps of the finished run: rows with epoch, step, fraction, metric, reference, layer,
        #: reference_layer and value.
        self.cross_layer_maps: list[dict[str, Any]] = []
        self.probe: Probe | None = None
        self.probe_fingerprint: str | None = None
        self.last_measured_step = -1
        self.store = SnapshotStore(config.max_snapshot_bytes)
        log = self.runtime.logger.info if self.runtime.is_global_zero else (lambda *args: None)
        self.snapshots = Snapshotter(
            self.model, self.specs, config, self.store, self.cross_layer, warn_once=self.warn_once, log=log
        )
        self.outputs = RunOutputs(self.writers, self.log_dir, self.runtime, config.metrics)
        announce = self.outputs.freeze_event
        self.freezing = FreezingCoordinator(self.model, config, self.store, self.runtime, self.warn_once, announce)
        self._comparisons: Comparisons | None = None
        #: Warns once when measuring takes a large share of the fit.
        self.cost = CostWatch(self.warn_once)

    @property
    def layers(self) -> list[str]:
        """Monitored layers in bottom-up (forward) order, known after the first probe."""
        return self.snapshots.layers

    @property
    def reference_names(self) -> list[str]:
        """Names of the references, as they appear in the history and the tags."""
        return self.config.reference_names

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has built the probe."""
        return self.probe is not None

    @property
    def by_step(self) -> bool:
        """Whether measurements are identified by global step (``every_n_train_steps``) rather than by epoch."""
        return self.config.every_n_train_steps is not None

    @property
    def measured(self) -> list[int]:
        """The measured points (epochs, or global steps when measuring by steps), in order."""
        return self.timeline.measured

    @property
    def frozen(self) -> dict[str, int]:
        """Frozen layers -> the epoch at which they froze."""
        return self.freezing.frozen

    def compute_dtype(self) -> torch.dtype:
        """The decomposition precision: ``compute_dtype``, with ``"auto"`` resolved for the model's device."""
        return preflight.compute_dtype(self.config, self.model)

    def prepare(self) -> None:
        """Build the probe and run two of its samples through the model, so a bad probe fails before training.

        Done once; :meth:`start` calls it when the loop has not.
        """
        if self.probe is not None:
            return
        began = time.perf_counter()
        self.probe = preflight.probe_for(self, self.warn_once)
        assert self.probe is not None
        capture = preflight.capture_for(
            self.model, self.probe, self.specs, self.config, self.runtime, skip=self._skip, warn_once=self.warn_once
        )
        preflight.keep_measurable(self, capture)
        self.snapshots.attach(capture)
        self.freezing.attach(capture)
        self.cost.prepared(began, time.perf_counter() - began)

    def start(self, *, step: int = 0) -> None:
        """Build the probe and measure epoch 0 (the initial snapshot), or, when resuming, the fixed references."""
        self.prepare()
        capture = self.snapshots.capture
        assert capture is not None
        config = self.config
        axis = "step" if self.by_step else "epoch"
        self.outputs.open(self.store, axis=axis, heatmap_time_share=config.heatmap_time_share)
        if self.log_dir is not None and self.cross_layer is not None:
            self.cross_layer.folder = self.store.directory
        self._comparisons = Comparisons(
            self.store,
            config.references,
            config.metrics,
            baseline=config.baseline,
            timeline=self.timeline,
            collective=capture.collective,
            device=device_of(self.model),
            dtype=capture.options.dtype,
        )
        self.cost.start()
        if self.runtime.is_global_zero:  # said before the first measurement, and what it may say about the layers
            self.runtime.logger.info("SVCCA monitors %s", format_layers(self.layers))
            charted = self.reference_names + (["baseline"] if config.baseline else [])
            self.outputs.layout(charted, self.layers, frozen=config.freeze is not None)
        if not self.timeline.points:  # a new run (a resumed one has points, even when its snapshots were dropped)
            self._measure(0, step)
        else:
            self.snapshots.fixed_references()

    def observe_loss(self, loss: Any) -> None:
        """Report a training batch's loss (a tensor or a number): the freeze policy's task gate reads it.

        Call it after each training step; a tensor stays on its device until the next measurement, so this costs
        no synchronisation. Without it, :class:`~lightning_svcca.FreezePolicy` decides from the representations
        alone and says so once.
        """
        self.freezing.observe_loss(loss)

    def measure(self, *, epoch: int, step: int, loss: Any = None) -> list[dict[str, Any]]:
        """Measure after ``epoch`` completed epochs (1 after the first) and ``step`` optimizer steps; new rows.

        Does nothing (and returns ``[]``) when no training step happened since the last measurement, or, when
        measuring per epoch, when ``epoch`` was measured already or is not a multiple of ``every_n_epochs``
        (with ``every_n_train_steps`` the loop decides when to call). Freezes converged layers when a
        :class:`~lightning_svcca.FreezePolicy` is set. ``loss``: the training loss since the last call, when the
        loop does not report each step's with :meth:`observe_loss`.
        """
        if loss is not None:
            self.observe_loss(loss)
        if self.probe is None:
            raise RuntimeError("call start() before measure(): it builds the probe and measures the initial model")
        if step <= self.last_measured_step:
            return []
        if not self.by_step and epoch in self.timeline:
            self.warn_once(
                "measure-same-epoch",
                f"measure(epoch={epoch}, step={step}) measured nothing: epoch {epoch} was measured already (at step"
                f" {self.timeline.at(epoch)[1]}). The monitor measures once per epoch, after it; to measure within"
                " epochs, pass every_n_train_steps=... and call measure when you want a measurement",
            )
            return []
        if not self.by_step and epoch % (self.config.every_n_epochs or 1):
            return []
        return self._measure(epoch, step)

    def finish(self, *, epoch: int, step: int) -> list[dict[str, Any]]:
        """At the end of training: measure the final weights if needed, then every epoch against them ("final").

        The ``final`` rows replace any earlier ones (a run finished, checkpointed and finished again keeps one set).
        """
        if self.probe is None:
            return []
        rows: list[dict[str, Any]] = []
        if step > self.last_measured_step or not self.timeline:
            last = self.timeline.latest if self.timeline else -1
            epoch = int(epoch) if self.by_step else max(int(epoch), last + 1)
            rows += self._measure(epoch, step, decide_freezes=False, live_final=False)
        assert self._comparisons is not None
        started = time.perf_counter()
        if self._comparisons.wants_final:
            rows += self._compare_with_final()
        if self.cross_layer is not None:
            self.cross_layer_maps = self.outputs.cross_layer(self.cross_layer)
        self.outputs.flush()
        self.cost.spent(time.perf_counter() - started)
        summary = self.cost.summary()
        if summary is not None and self.runtime.is_global_zero:
            self.runtime.logger.info(summary)
        return rows

    def close(self) -> None:
        """Delete temporary files (spilled snapshots, the prefix cache); the history and the run's files stay."""
        self.store.close()
        self.freezing.close()

    def __enter__(self) -> SVCCAMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def restore_freezes(self, *, hard: bool = True) -> None:
        """Apply freezes restored from a checkpoint (before any training step); ``hard=False``: gradients dropped."""
        self.freezing.restore(hard=hard)

    def before_batch(self, epoch: int | None = None, batch: Any = None) -> None:
        """Call at each batch start: frozen BatchNorm layers back in eval mode whatever ``model.train()`` did.

        ``epoch`` (the loop's own count) lets the frozen-prefix cache (``FreezePolicy(cache_outputs=True)``) notice
        epochs whose inputs never repeat (random augmentation) and turn itself off. ``batch``: the training batch,
        from which an ``IndexedDataset``'s indices are taken (in place) for ``FreezePolicy(cache_key="index")``.
        """
        self.freezing.before_batch(epoch, batch)

    def before_optimizer_step(self) -> None:
        """Soft freezing only: drop the frozen parameters' gradients."""
        self.freezing.before_optimizer_step()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: a flat dict (:mod:`~lightning_svcca.monitoring.state`)."""
        return monitor_state.state_of(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (keys missing from older checkpoints take their defaults)."""
        monitor_state.load_state(self, state_dict)

    def _measure(
        self, epoch: int, step: int, *, decide_freezes: bool = True, live_final: bool = True
    ) -> list[dict[str, Any]]:
        """Record the probe, snapshot every layer, compare with the references, store, freeze and report; new rows."""
        assert self._comparisons is not None
        started = time.perf_counter()
        point = step if self.by_step else epoch
        # record: past a verified frozen prefix, whose layers' snapshots at the last point are reused (not with
        # cross-layer maps: they need every layer's pass)
        last = self.timeline.latest if self.cross_layer is None else None
        recorder, reused = self.freezing.probe_pass(self.layers, last, device_of(self.model))
        self.probe_timings[point] = time.perf_counter() - started
        # snapshot: this point's, the cross-layer moment's, and the fixed references' at the first measurement
        snapshots = self.snapshots.take(recorder, reused, epoch, first=not self.timeline)
        self.snapshots.keep_moment(recorder, point, epoch, step, run_length(self.config, self.runtime))
        if not self.timeline:
            self.snapshots.fixed_references(recorder)
        # compare, then store: the point joins the timeline
        rows = self._comparisons.rows_for(point, epoch, step, snapshots)
        self.snapshots.keep(point, snapshots, reused, last)
        self.timeline.add(point, epoch, step)
        self.last_measured_step = int(step)
        # freeze, then report (the cache's scalars are taken before a freeze replaces the cache)
        cache_scalars = self.freezing.cache_scalars(epoch, step)
        rows += self._freeze(rows, epoch, step, decide=decide_freezes, probe_loss=recorder.probe_loss)
        self.history.extend(rows)
        self._comparisons.prune(point)
        heatmaps = self._comparisons.heatmap_sources(point, self.history, self.layers, live_final=live_final)
        self.outputs.measurement(rows + cache_scalars, step, heatmaps, self.history, self.layers)
        self.timings[point] = time.perf_counter() - started
        planned = planned_measurements(self.config, self.runtime)
        self.cost.measured(self.timings[point], planned, len(self.timeline), self.probe_timings[point])
        return rows

    def _freeze(
        self, rows: list[dict[str, Any]], epoch: int, step: int, *, decide: bool, probe_loss: float | None = None
    ) -> list[dict[str, Any]]:
        """Freeze the layers the policy finds converged (unless ``decide`` is off); the ``frozen`` rows."""
        if decide and self.config.freeze is not None:
            measurement = len(self.timeline) - 1
            lagged = self.config.freeze.rule.lagged
            point = step if self.by_step else epoch
            span = lag = None
            if lagged is not None and lagged.fraction:  # the window the rule reads, in epochs (steps) and measurements
                span = self.timeline.span_by_fraction(point, lagged.fraction)
                lag = self.timeline.lag_by_fraction(point, lagged.fraction)
            self.freezing.freeze_converged(
                rows, epoch, step, self.layers, measurement, probe_loss=probe_loss, span=span, lag=lag, point=point
            )
        return self.freezing.frozen_rows(epoch, step, self.layers)

    def _compare_with_final(self) -> list[dict[str, Any]]:
        """At the end of fit: every measured point against the latest, replacing earlier ``final`` rows."""
        assert self._comparisons is not None
        latest = self.timeline.latest
        assert latest is not None
        final = self._comparisons.against_point(latest, "final", self.layers)
        self.history = [r for r in self.history if r["reference"] != "final"] + final
        self.outputs.final(self.history, final, self.timeline.at(latest)[1], self.layers)
        return final

    def _skip(self, epoch: int, layer: str, reason: str) -> None:
        self.skipped.append((epoch, layer, reason))
        self.warn_once(
            f"skip:{layer}:{reason.split(':')[0][:40]}",
            f"layer {layer!r} skipped at epoch {epoch}: {reason}. Training goes on; later epochs with the same"
            " problem are listed in skipped without a new warning",
        )

    def warn_once(self, key: str, message: str) -> None:
        """Warn (on rank zero) with :class:`SVCCAMonitorWarning`, once per ``key`` for this monitor."""
        if key in self._warned:
            return
        self._warned.add(key)
        if self.runtime.is_global_zero:
            warnings.warn(message, SVCCAMonitorWarning, stacklevel=3)
