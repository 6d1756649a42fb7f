"""SVCCAMonitor: the whole measurement pipeline, with no training framework attached.

probe -> activations -> snapshots -> comparisons -> history -> outputs. The monitor runs a fixed probe batch
through the model (:mod:`~lightning_svcca.pipeline.capture`), compares each layer's snapshot with the references
(:mod:`~lightning_svcca.pipeline.comparisons`), keeps every value in :attr:`SVCCAMonitor.history`, writes them to its
writers and the history CSV (:mod:`~lightning_svcca.output.reporting`), and can freeze converged layers
(:mod:`~lightning_svcca.freezing.freezer`). A training loop calls :meth:`~SVCCAMonitor.start` before its first step,
:meth:`~SVCCAMonitor.measure` after training steps and :meth:`~SVCCAMonitor.finish` at the end; the Lightning
callback and the HuggingFace ``TrainerCallback`` are such loops. What the monitor needs from a framework
(collectives, which process is rank zero, a precision context, what to do after a freeze) comes in a
:class:`Runtime`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_svcca.freezing.blocks import freeze_blocks
from lightning_svcca.freezing.freezer import Freezer
from lightning_svcca.freezing.frozen_prefix import FrozenPrefix
from lightning_svcca.freezing.policy import FreezeDecision
from lightning_svcca.measures.similarity import SimilarityWarning
from lightning_svcca.output.history import pack_history, unpack_history
from lightning_svcca.output.reporting import HISTORY_FILE, evenly_spaced, layer_map_image, write_history_csv
from lightning_svcca.output.writers import Reporter, as_writers
from lightning_svcca.pipeline.capture import Capture, CaptureOptions
from lightning_svcca.pipeline.comparisons import Comparisons, row, values_of
from lightning_svcca.pipeline.config import MonitorConfig
from lightning_svcca.pipeline.layers import LayerSpec, format_layers, resolve_layers
from lightning_svcca.pipeline.moments import CrossLayerMoments
from lightning_svcca.pipeline.probe import Probe, build_probe, check_not_meta
from lightning_svcca.pipeline.references import check_reference_layers, device_of, reference_model
from lightning_svcca.pipeline.snapshots import Collective, LocalCollective, Snapshot, SnapshotStore, snapshot_needs
from lightning_svcca.pipeline.wrappers import unwrap_model, wrapper_precision

__all__ = ["Runtime", "SVCCAMonitor", "SVCCAMonitorWarning"]

STATE_VERSION = 1
#: The folder under ``log_dir`` holding each run's snapshot files (``svcca_snapshots/<run_id>/``).
SNAPSHOT_FOLDER = "svcca_snapshots"
#: Epochs the live "final" heatmap compares with the latest one at most (the end-of-fit pass compares all).
LIVE_FINAL_COLUMNS = 10
#: Columns of the cross-layer CSV (``svcca_cross_layer.csv`` beside the history).
CROSS_LAYER_COLUMNS = ("epoch", "step", "fraction", "metric", "reference", "layer", "reference_layer", "value")
#: Metrics that a float32 decomposition computes accurately. The Gram route squares singular values, so float32
#: only resolves directions down to about 1% of the largest: CKA weights directions by their variance and barely
#: notices, but SVCCA's kept set (and so its value) can change by several hundredths on ill-conditioned layers.
_FLOAT32_SAFE_METRICS = ("linear_cka",)


class SVCCAMonitorWarning(SimilarityWarning):
    """A recoverable problem of the monitor (a skipped layer, a small probe); training goes on."""


def _identity(value: Any) -> Any:
    return value


@dataclass
class Runtime:
    """What the monitor needs from the training framework; the defaults describe a single process.

    Attributes:
        collective: sums and row gathers over all processes (sharded probes).
        is_global_zero: whether this process writes outputs and decides freezes.
        broadcast: rank zero's object on every process (freeze decisions).
        forward_context: a context manager factory wrapped around each probe pass (e.g. a precision context).
        convert_input: applied to each probe chunk before the forward pass (e.g. casting floating inputs to a
            ``bf16-true`` model's dtype, as the trainer does with training batches).
        after_freeze: called on every process after layers were frozen (e.g. to rebuild a DDP wrapper).
        max_epochs: the run's length in epochs, for ``FreezePolicy(mode="linear")`` and cross-layer moments.
        max_steps: the run's length in optimizer steps, for cross-layer moments when measuring by steps.
        logger: where freeze events are logged as text.
        probe_as_training: whether the probe's forward pass computes as the training step's does (``False`` under
            mixed precision with a full-precision probe): only then may the frozen-prefix cache serve it.
    """

    collective: Collective = field(default_factory=LocalCollective)
    is_global_zero: bool = True
    broadcast: Callable[[Any], Any] = _identity
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None
    convert_input: Callable[[Any], Any] | None = None
    after_freeze: Callable[[], None] | None = None
    max_epochs: int | None = None
    max_steps: int | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("lightning_svcca"))
    probe_as_training: bool = True


class SVCCAMonitor:
    """Measure how each layer's representation changes while a model trains, in any training loop.

    Build it from the model and a probe, call :meth:`start` before the first training step, :meth:`measure` after
    each epoch (or every k steps), :meth:`finish` at the end, and :meth:`close` when done (or use it as a context
    manager). Every value lands in :attr:`history`; with ``writers`` (a ``SummaryWriter``, Lightning loggers) and
    ``log_dir`` (``svcca_history.csv``) they are written out too. :meth:`state_dict` is a flat, versioned dict.

    Args:
        model: the model being trained.
        probe: a tensor (the model input), a batch (tuple, list or dict of tensors), a DataLoader (its first
            ``probe_size`` samples), or a function returning one of those (called at :meth:`start`).
        layers, reference, metrics, every_n_epochs, freeze: as for :class:`~lightning_svcca.SVCCACallback`.
        writers: where scalars, heatmaps and freeze events go: ``None``, a ``SummaryWriter``, a Lightning logger,
            anything with ``log_metrics(metrics, step)``, or a list of them.
        log_dir: where ``svcca_history.csv`` (and spilled snapshots) go; ``None``: no file, spills in the working
            directory.
        runtime: what the framework provides (collectives, rank, precision context, after-freeze hook).
        **options: the remaining keyword arguments of :class:`~lightning_svcca.SVCCACallback` (``probe_size``,
            ``keep``, ``baseline``, ``max_snapshot_bytes``, ...).

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

    def __init__(
        self,
        model: nn.Module,
        probe: Any = None,
        layers: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
        reference: Any = ("previous", "final"),
        metrics: str | Sequence[str] = ("svcca",),
        every_n_epochs: int | None = 1,
        freeze: Any = None,
        *,
        writers: Any = None,
        log_dir: str | Path | None = None,
        runtime: Runtime | None = None,
        **options: Any,
    ) -> None:
        config = MonitorConfig(
            probe=probe,
            layers=layers,
            reference=reference,
            metrics=metrics,
            every_n_epochs=every_n_epochs,
            freeze=freeze,
            **options,
        )
        self._init(model, config, writers=writers, log_dir=log_dir, runtime=runtime)

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        config: MonitorConfig,
        *,
        writers: Any = None,
        log_dir: str | Path | None = None,
        runtime: Runtime | None = None,
    ) -> SVCCAMonitor:
        """A monitor from an already checked :class:`MonitorConfig` (what the callbacks hold)."""
        monitor = cls.__new__(cls)
        monitor._init(model, config, writers=writers, log_dir=log_dir, runtime=runtime)
        return monitor

    def _init(
        self,
        model: nn.Module,
        config: MonitorConfig,
        *,
        writers: Any,
        log_dir: str | Path | None,
        runtime: Runtime | None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = unwrap_model(model)
        self.config = config
        self.runtime = runtime or Runtime(**wrapper_precision(model))
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.writers = as_writers(writers)
        self.specs: list[LayerSpec] = resolve_layers(self.model, config.layers, config.reduction)
        self._check_against_model()
        #: Every measured value: dicts with keys epoch, layer, reference, metric, value.
        self.history: list[dict[str, Any]] = []
        #: Frozen layers -> the epoch at which they froze.
        self.frozen: dict[str, int] = {}
        #: Layers skipped at some epoch: (epoch, layer, reason).
        self.skipped: list[tuple[int, str, str]] = []
        #: Seconds each measurement took, by epoch (probe, snapshots, comparisons, outputs).
        self.timings: dict[int, float] = {}
        #: Seconds of each measurement's probe pass (the forward pass with hooks), by epoch.
        self.probe_timings: dict[int, float] = {}
        self.freezer = Freezer(policy=config.freeze, spill_dir=self._cache_dir)
        self.streaks: dict[str, int] = {}
        self.measured: list[int] = []
        #: Each measured point (the epoch, or the global step when measuring every k steps) -> (epoch, step).
        self.points: dict[int, tuple[int, int]] = {}
        #: This run's id: its snapshot folder under ``log_dir`` (kept across resumes).
        self.run_id: str | None = None
        #: The history CSV's file name in ``log_dir`` (unique among runs sharing the folder).
        self.csv_name: str | None = None
        #: Layers kept at moments of the run for cross-layer maps (``cross_layer=...``), or ``None``.
        self.cross_layer = (
            CrossLayerMoments(config.cross_layer_moments, config.cross_layer_reference)
            if config.cross_layer_moments
            else None
        )
        #: The cross-layer maps of the finished run: rows with epoch, step, fraction, metric, reference, layer,
        #: reference_layer and value.
        self.cross_layer_maps: list[dict[str, Any]] = []
        self.layer_order: list[str] = []
        self.probe: Probe | None = None
        self.probe_fingerprint: str | None = None
        self.last_measured_step = -1
        self.store = SnapshotStore(config.max_snapshot_bytes)
        self._capture: Capture | None = None
        self._frozen_prefix: FrozenPrefix | None = None
        self._comparisons: Comparisons | None = None
        self._reporter: Reporter | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------------------
    # Read-only views
    # ------------------------------------------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """Monitored layers in bottom-up (forward) order, known after the first probe."""
        return list(self.layer_order) or [spec.name for spec in self.specs]

    @property
    def reference_names(self) -> list[str]:
        """Names of the references, as they appear in the history and the tags."""
        return self.config.reference_names

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has built the probe."""
        return self.probe is not None

    # ------------------------------------------------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Build the probe and run two of its samples through the model, so a bad probe fails before training.

        Done once; :meth:`start` calls it when the loop has not.
        """
        if self.probe is not None:
            return
        self._build_probe()
        config = self.config
        full_rank, with_right = snapshot_needs(config.metrics)
        self._capture = Capture(
            self.probe,
            self.specs,
            CaptureOptions(
                probe_batch_size=config.probe_batch_size,
                forward_fn=config.forward_fn,
                max_datapoints=config.max_datapoints,
                keep=config.keep,
                keep_by=config.keep_by,
                full_rank=full_rank,
                with_right=with_right,
                keep_means=self.cross_layer is not None,
                dtype=self.compute_dtype(),
            ),
            self._probe_collective(),
            skip=self._skip,
            warn_once=self.warn_once,
            forward_context=self.runtime.forward_context,
            convert_input=self.runtime.convert_input,
        )
        self._capture.check(self.model, device_of(self.model))
        self._frozen_prefix = FrozenPrefix(
            self._capture,
            self.store,
            self.freezer,
            self.runtime.collective,
            self.warn_once,
            serve_probe=self.runtime.probe_as_training,
        )

    def start(self, *, step: int = 0) -> None:
        """Build the probe and measure epoch 0 (the initial snapshot), or, when resuming, the fixed references."""
        self.prepare()
        assert self._capture is not None
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        if self.log_dir is not None:
            self.store.persist_to(self.log_dir / SNAPSHOT_FOLDER / self.run_id)
            if self.cross_layer is not None:
                self.cross_layer.folder = self.store.directory
        config = self.config
        self._comparisons = Comparisons(
            self.store,
            config.references,
            config.metrics,
            baseline=config.baseline,
            measured=self.measured,
            points=self.points,
            collective=self._capture.collective,
            device=device_of(self.model),
            dtype=self._capture.options.dtype,
            lag_in_measurements=self.by_step,
        )
        self._reporter = Reporter(
            self.writers if self.runtime.is_global_zero else [],
            self._claim_csv(),
            axis="step" if self.by_step else "epoch",
            heatmap_time_share=self.config.heatmap_time_share,
        )
        if not self.measured:
            self._measure(0, step)
        else:
            self._snapshot_fixed_references()
        if self.runtime.is_global_zero:
            self.runtime.logger.info("SVCCA monitors %s", format_layers(self.layers))
            charts = [(metric, name) for metric in config.metrics for name in self._chart_references()]
            charts += [("svcca", "dims")] + ([("svcca", "frozen")] if config.freeze is not None else [])
            self._reporter.layout(charts, self.layers)

    @property
    def by_step(self) -> bool:
        """Whether measurements are identified by global step (``every_n_train_steps``) rather than by epoch."""
        return self.config.every_n_train_steps is not None

    def measure(self, *, epoch: int, step: int) -> list[dict[str, Any]]:
        """Measure after ``epoch`` completed epochs (1 after the first) and ``step`` optimizer steps; new rows.

        Does nothing (and returns ``[]``) when no training step happened since the last measurement, or, when
        measuring per epoch, when ``epoch`` was measured already or is not a multiple of ``every_n_epochs``
        (with ``every_n_train_steps`` the loop decides when to call). Freezes converged layers when a
        :class:`~lightning_svcca.FreezePolicy` is set.
        """
        self._require_started("measure")
        if step <= self.last_measured_step:
            return []
        if not self.by_step and (epoch in self.measured or epoch % (self.config.every_n_epochs or 1)):
            return []
        return self._measure(epoch, step)

    def finish(self, *, epoch: int, step: int) -> list[dict[str, Any]]:
        """At the end of training: measure the final weights if needed, then every epoch against them ("final").

        The ``final`` rows replace any earlier ones (a run finished, checkpointed and finished again keeps one set).
        """
        if self.probe is None:
            return []
        rows: list[dict[str, Any]] = []
        if step > self.last_measured_step or not self.measured:
            last = self.measured[-1] if self.measured else -1
            epoch = int(epoch) if self.by_step else max(int(epoch), last + 1)
            rows += self._measure(epoch, step, decide_freezes=False, live_final=False)
        assert self._comparisons is not None and self._reporter is not None
        if self._comparisons.wants_final:
            final = self._comparisons.against_point(self.measured[-1], "final", self.layers)
            self.history = [r for r in self.history if r["reference"] != "final"] + final
            if self.runtime.is_global_zero:
                last_step = self.points[self.measured[-1]][1]
                self._reporter.write_csv(self.history)
                self._reporter.late_scalars(final)
                for metric in self.config.metrics:
                    image = self._reporter.heatmap(
                        self.history, reference="final", metric=metric, layers=self.layers, step=last_step, always=True
                    )
                    ours = [r for r in final if r["metric"] == metric]
                    self._reporter.final_summary(image, ours, last_step, f"{metric}/final/heatmap")
            rows += final
        self._finish_cross_layer()
        self._reporter.flush()
        return rows

    def _finish_cross_layer(self) -> None:
        """Each kept moment against the cross-layer reference: rows, a CSV beside the history, and images."""
        if self.cross_layer is None:
            return
        self.cross_layer_maps = []
        for moment, layer_map in self.cross_layer.maps(self.config.metrics):
            for i, layer in enumerate(layer_map.rows):
                for j, other in enumerate(layer_map.columns):
                    self.cross_layer_maps.append(
                        {
                            "epoch": moment.epoch,
                            "step": moment.step,
                            "fraction": moment.fraction,
                            "metric": layer_map.metric,
                            "reference": self.cross_layer.reference,
                            "layer": layer,
                            "reference_layer": other,
                            "value": float(layer_map.values[i, j]),
                        }
                    )
            if self.runtime.is_global_zero and self._reporter is not None:
                title = (
                    f"{layer_map.metric}: epoch {moment.epoch} ({moment.fraction:.0%}) vs {self.cross_layer.reference}"
                )
                image = layer_map_image(layer_map.rows, layer_map.columns, layer_map.values.numpy(), title=title)
                self._reporter.image(f"{layer_map.metric}/cross_layer/{self.cross_layer.reference}", image, moment.step)
        if self.runtime.is_global_zero and self.log_dir is not None and self.csv_name is not None:
            name = self.csv_name.replace("history", "cross_layer")
            write_history_csv(self.cross_layer_maps, self.log_dir / name, columns=CROSS_LAYER_COLUMNS)

    def _pooled(self, recorder: Any, layers: Sequence[str]) -> dict[str, Tensor]:
        """Each layer's output averaged over its positions (one datapoint per sample), every process's gathered."""
        assert self._capture is not None
        return {
            layer: self._capture.collective.gather_rows(recorder.means[layer]).float().cpu()
            for layer in layers
            if layer in recorder.means
        }

    def close(self) -> None:
        """Delete temporary files (spilled snapshots, the prefix cache); the history and the run's files stay."""
        self.store.close()
        self.freezer.close()

    def __enter__(self) -> SVCCAMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------------------
    # Freezing, for the training loop
    # ------------------------------------------------------------------------------------------------------------

    def restore_freezes(self, *, hard: bool = True) -> None:
        """Apply freezes restored from a checkpoint (before any training step); ``hard=False``: gradients dropped."""
        self.freezer.hard = hard
        if self.freezer.parameters:
            self.freezer.apply(self.model, norms=False)
            if hard and self.runtime.after_freeze is not None:
                self.runtime.after_freeze()

    def before_batch(self, epoch: int | None = None) -> None:
        """Call at each batch start: frozen BatchNorm layers back in eval mode whatever ``model.train()`` did.

        ``epoch`` (the loop's own count) lets the frozen-prefix cache (``FreezePolicy(cache_outputs=True)``) notice
        epochs whose inputs never repeat (random augmentation) and turn itself off.
        """
        self.freezer.start_batch(self.model, -1 if epoch is None else int(epoch))

    def before_optimizer_step(self) -> None:
        """Soft freezing only: drop the frozen parameters' gradients."""
        if not self.freezer.hard and self.freezer.parameters:
            self.freezer.drop_gradients(self.model)

    # ------------------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: history, freezes, policy counters, snapshots."""
        return {
            "version": STATE_VERSION,
            "history": pack_history(self.history),
            "frozen": dict(self.frozen),
            "streaks": dict(self.streaks),
            "freezer": self.freezer.state_dict(),
            "measured": list(self.measured),
            "layer_order": list(self.layer_order),
            "last_measured_step": self.last_measured_step,
            "probe_fingerprint": self.probe_fingerprint,
            "snapshots": self.store.state_dict(),
            "skipped": [list(entry) for entry in self.skipped],
            "points": {str(point): list(at) for point, at in self.points.items()},
            "run_id": self.run_id,
            "csv_name": self.csv_name,
            "cross_layer": {} if self.cross_layer is None else self.cross_layer.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (keys missing from older checkpoints take their defaults)."""
        self.history = unpack_history(state_dict.get("history", []))
        self.frozen = dict(state_dict.get("frozen", {}))
        self.streaks = dict(state_dict.get("streaks", {}))
        self.freezer.load_state_dict(state_dict.get("freezer", {}))
        self.measured[:] = list(state_dict.get("measured", []))
        self.layer_order = list(state_dict.get("layer_order", []))
        self.last_measured_step = int(state_dict.get("last_measured_step", -1))
        self.probe_fingerprint = state_dict.get("probe_fingerprint")
        missing = self.store.load_state_dict(state_dict.get("snapshots", {}))
        self.skipped = [tuple(entry) for entry in state_dict.get("skipped", [])]
        points = state_dict.get("points") or {point: (point, -1) for point in self.measured}  # before steps were kept
        self.points.clear()
        self.points.update({int(point): (int(at[0]), int(at[1])) for point, at in points.items()})
        self.run_id = state_dict.get("run_id")
        self.csv_name = state_dict.get("csv_name")
        if self.cross_layer is not None:
            self.cross_layer.load_state_dict(state_dict.get("cross_layer", {}))
        if missing:
            self.warn_once(
                "snapshots-missing",
                f"the checkpoint's snapshot files of {len(missing)} layer/epoch pairs are gone (e.g. {missing[:3]});"
                " the run goes on with what it has: comparisons with those epochs are skipped, and a freeze policy"
                " may need more epochs to decide. Keep the run's svcca_snapshots folder with its checkpoints",
            )

    # ------------------------------------------------------------------------------------------------------------
    # Measuring
    # ------------------------------------------------------------------------------------------------------------

    def _measure(
        self, epoch: int, step: int, *, decide_freezes: bool = True, live_final: bool = True
    ) -> list[dict[str, Any]]:
        """Snapshot every layer at ``epoch``/``step``, compare with the references, log, and decide freezes."""
        assert self._capture is not None and self._comparisons is not None and self._frozen_prefix is not None
        started = time.perf_counter()
        device = device_of(self.model)
        last = self.measured[-1] if self.measured and self.cross_layer is None else None
        known = self._frozen_prefix.known_layers(self.layers, last, device) if self.freezer.caching else []
        recorder = self._frozen_prefix.record(self.model, device, known)
        point = step if self.by_step else epoch
        self.probe_timings[point] = time.perf_counter() - started
        layers = self._settle_layer_order(recorder.order)
        recorded = self._capture.snapshots(
            recorder, [layer for layer in layers if layer not in known], epoch, device, label=f"epoch {epoch}"
        )
        reused = self._frozen_prefix.reused(known, last) if known else {}
        snapshots = {
            layer: reused[layer] if layer in reused else recorded[layer]
            for layer in layers
            if layer in reused or layer in recorded
        }
        if self.cross_layer is not None:
            total = self.runtime.max_steps if self.by_step else self.runtime.max_epochs
            self.cross_layer.observe(point, epoch, step, self._pooled(recorder, layers), total)
        if not self.measured:
            self._snapshot_fixed_references(recorder)
        self.points[point] = (int(epoch), int(step))
        rows = self._comparisons.rows_for(point, snapshots)
        for layer, snapshot in snapshots.items():
            if layer in reused:
                self.store.alias((layer, str(point)), (layer, str(last)))
            else:
                self.store.put((layer, str(point)), snapshot)
        self.measured.append(point)
        self.last_measured_step = int(step)
        policy = self.config.freeze
        if policy is not None and decide_freezes:
            self._decide_and_freeze(self._frozen_prefix.completion, epoch, step, rows)
        if policy is not None or self.frozen:
            rows += [row(epoch, step, layer, "frozen", "svcca", float(layer in self.frozen)) for layer in self.layers]
        self.history.extend(rows)
        self._comparisons.prune(point)
        # heatmaps of the references the user asked for (a freeze policy's lag reference is only charted)
        heatmaps: dict[str, Sequence[dict[str, Any]]] = {
            ref.name: self.history for ref in self.config.references if ref.kind not in ("final", "lag")
        }
        if self._comparisons.wants_final and len(self.measured) > 1 and live_final:
            # the learning-dynamics picture so far, against the latest epoch (not kept in the history): at most
            # LIVE_FINAL_COLUMNS epochs, so a measurement costs the same at epoch 10 and at epoch 1000
            shown = evenly_spaced(self.measured, LIVE_FINAL_COLUMNS)
            heatmaps["final"] = self._comparisons.against_point(point, "final", self.layers, shown)
        self._report(rows, step, heatmaps)
        self.timings[point] = time.perf_counter() - started
        return rows

    def _settle_layer_order(self, order: Sequence[str]) -> list[str]:
        """Bottom-up order from the first probe; layers that did not run are dropped with a warning."""
        if not self.layer_order:
            monitored = {spec.name for spec in self.specs}
            ran = [name for name in order if name in monitored]
            missing = [spec.name for spec in self.specs if spec.name not in ran]
            if missing and self.config.layers is not None:
                self.warn_once(
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
        return self.layer_order

    def _snapshot_fixed_references(self, recorder: Any = None) -> None:
        """Snapshot each fixed reference once per layer (restored from checkpoints afterwards)."""
        assert self._capture is not None
        device = device_of(self.model)
        for reference in self.config.references:
            if not reference.fixed or all((layer, reference.name) in self.store for layer in self.layers):
                continue
            snapshots: dict[str, Snapshot]
            if reference.kind == "tensor":
                if recorder is None:
                    recorder = self._capture.record(self.model, device, monitored=True)
                snapshots = self._capture.feature_snapshots(reference.name, reference.source, recorder, self.layers)
            else:
                with reference_model(reference, self.model) as model:
                    reference_recorder = self._capture.record(model, device, label=f"reference {reference.name!r}")
                if self.cross_layer is not None and reference.name == self.cross_layer.reference:
                    self.cross_layer.set_reference(self._pooled(reference_recorder, self.layers))
                snapshots = self._capture.snapshots(
                    reference_recorder, self.layers, 0, device, label=f"reference {reference.name!r}"
                )
            for layer, snapshot in snapshots.items():
                self.store.put((layer, reference.name), snapshot)

    def _decide_and_freeze(self, completion: Sequence[str], epoch: int, step: int, rows: list[dict[str, Any]]) -> None:
        """Decide on rank zero, broadcast, apply on every process at the same step."""
        policy = self.config.freeze
        assert policy is not None
        decisions: list[FreezeDecision] = []
        if self.runtime.is_global_zero:
            similarities = values_of(rows, self.config.lag_reference, policy.metric)
            baselines = values_of(rows, "baseline", policy.metric)
            decisions = policy.decide(
                epoch,
                self.layers,
                self.frozen,
                self.streaks,
                similarities,
                baselines,
                self.runtime.max_epochs,
                compared_with=f"the snapshot {policy.lag} measurement(s) earlier" if self.by_step else None,
            )
        decisions, self.streaks = self.runtime.broadcast((decisions, self.streaks))
        if not decisions:
            return
        blocks = freeze_blocks(completion, self.layers, self.model)
        for decision in decisions:
            block = blocks[decision.layer]
            if not self.freezer.leaves_trainable(self.model, block):
                self.warn_once(
                    "freeze-all",
                    f"the freeze policy would freeze every trainable parameter at layer {decision.layer!r}; it stops"
                    " one short and that layer keeps training. Use FreezePolicy(keep_last=1) or more",
                )
                break
            self.freezer.freeze(self.model, decision.layer, block)
            self.frozen[decision.layer] = epoch
            if not block.parameters:  # nothing of its own to freeze: it counts for the order, but is no freeze
                self.runtime.logger.debug(f"layer {decision.layer!r} has no parameters of its own: {decision.reason}")
                continue
            count = len(block.parameters)
            message = (
                f"froze layer {decision.layer!r} at epoch {epoch} ({count} parameter tensor{'s' * (count != 1)}):"
                f" {decision.reason}"
            )
            if self.runtime.is_global_zero:
                self.runtime.logger.info(message)
                if self._reporter is not None:
                    self._reporter.text("svcca/freeze", message, step)
        if self.freezer.hard and self.runtime.after_freeze is not None:
            self.runtime.after_freeze()

    # ------------------------------------------------------------------------------------------------------------
    # Outputs and plumbing
    # ------------------------------------------------------------------------------------------------------------

    def _report(self, rows: list[dict[str, Any]], step: int, heatmaps: Mapping[str, Sequence[dict[str, Any]]]) -> None:
        """On rank zero: rows as scalars, a heatmap per reference (drawn from the rows given for it), the CSV."""
        if not self.runtime.is_global_zero or self._reporter is None:
            return
        self._reporter.scalars(rows)
        for reference, source in heatmaps.items():
            for metric in self.config.metrics:
                self._reporter.heatmap(source, reference=reference, metric=metric, layers=self.layers, step=step)
        self._reporter.write_csv(self.history)

    def _chart_references(self) -> list[str]:
        return self.reference_names + (["baseline"] if self.config.baseline else [])

    def _check_against_model(self) -> None:
        """Layer names, module references and a freeze schedule must fit the model before anything runs."""
        names = [spec.name for spec in self.specs]
        for reference in self.config.references:
            if reference.kind == "module":
                check_reference_layers(reference, names)
            elif reference.kind == "checkpoint" and not Path(reference.source).is_file():
                raise FileNotFoundError(f"reference {reference.name!r}: no checkpoint file at {reference.source}")
        policy = self.config.freeze
        if policy is not None and policy.mode == "schedule":
            unknown = sorted(set(policy.schedule or {}) - set(names))
            if unknown:
                raise ValueError(
                    f"FreezePolicy.schedule names layers that are not monitored: {unknown}; monitored: {names}"
                )

    def _build_probe(self) -> None:
        config = self.config
        source = config.probe() if callable(config.probe) and not isinstance(config.probe, nn.Module) else config.probe
        if source is None:
            raise ValueError("no probe: pass probe=<tensor, batch or DataLoader> (a few hundred samples or more)")
        check_not_meta(source)
        self.probe = build_probe(
            source,
            config.probe_size,
            input_key=config.probe_input,
            mask_key=config.probe_mask,
            seed=config.probe_seed,
        )
        if isinstance(source, DataLoader) and self.probe.size < config.probe_size:
            self.warn_once(
                "probe-truncated",
                f"probe_size={config.probe_size} but the probe DataLoader holds only {self.probe.size} samples: the"
                f" probe is all {self.probe.size} of them. Pass probe_size=<n> (or more data) to silence this",
            )
        fingerprint = self.probe.fingerprint()
        if self.probe_fingerprint is not None and fingerprint != self.probe_fingerprint and self.store.keys():
            self.warn_once(
                "probe-changed",
                "the probe differs from the one in the checkpoint, so earlier snapshots describe other datapoints;"
                " they are dropped (history and freezes are kept) and comparisons start again from this epoch",
            )
            for key in self.store.keys():
                self.store.discard(key)
            self.measured.clear()
        self.probe_fingerprint = fingerprint
        if self.probe.size < 2:
            raise ValueError(f"the probe has {self.probe.size} sample(s); it needs at least 2")

    def compute_dtype(self) -> torch.dtype:
        """The decomposition precision: ``compute_dtype``, with ``"auto"`` resolved for the model's device."""
        chosen = self.config.dtype
        if chosen is not None:
            return chosen
        on_gpu = device_of(self.model).type == "cuda"
        return torch.float32 if on_gpu and set(self.config.metrics) <= set(_FLOAT32_SAFE_METRICS) else torch.float64

    def _probe_collective(self) -> Collective:
        """The full collective for a sharded probe, or this process alone (no sharding, or a tiny probe)."""
        collective = self.runtime.collective
        assert self.probe is not None
        if collective.world_size < 2 or not self.config.shard_probe or self.probe.size < 2 * collective.world_size:
            return LocalCollective()
        return collective

    def _require_started(self, what: str) -> None:
        if self.probe is None:
            raise RuntimeError(f"call start() before {what}(): it builds the probe and measures the initial model")

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

    def _cache_dir(self) -> Path:
        """A fresh folder for the frozen-prefix cache's spill files: in the run's folder, else a temporary one."""
        if self.store.directory is not None:
            return self.store.directory / f"prefix_cache_{uuid.uuid4().hex[:8]}"
        return Path(tempfile.mkdtemp(prefix="svcca_prefix_cache_"))

    def _claim_csv(self) -> Path | None:
        """This run's history CSV: ``svcca_history.csv``, or the first free ``svcca_history-N.csv`` beside it."""
        if self.log_dir is None or not self.runtime.is_global_zero:
            return None
        if self.csv_name is not None:
            return self.log_dir / self.csv_name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stem, suffix = HISTORY_FILE.rsplit(".", 1)
        for index in range(10_000):
            name = HISTORY_FILE if index == 0 else f"{stem}-{index}.{suffix}"
            try:
                (self.log_dir / name).open("x").close()  # claimed atomically: concurrent runs get different names
            except FileExistsError:
                continue
            self.csv_name = name
            return self.log_dir / name
        raise RuntimeError(f"no free history file name in {self.log_dir}")
