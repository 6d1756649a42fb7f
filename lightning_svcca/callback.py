"""SVCCACallback: the Lightning glue.

Hooks are thin: each guards, then delegates to a named private method, which delegates to the modules below
(probe, activations, snapshots, reporting, freezing). All logic lives in :class:`_SVCCACallbackCore`, which
uses the trainer only through attributes that both Lightning namespaces share; :class:`SVCCACallback` combines
it with ``pytorch_lightning.Callback`` and ``lightning_svcca.lightning.SVCCACallback`` with
``lightning.pytorch.Callback``.

When things happen in a fit:

* ``setup``: layer names, references and the freeze policy are checked against the model.
* ``on_fit_start``: freezes restored from a checkpoint are applied again (before any training step).
* ``on_train_start``: the probe is built; epoch 0 is measured (the "initial" snapshot) and fixed references
  are snapshotted.
* end of each training epoch, on its last batch (so before validation and before ``ModelCheckpoint`` saves):
  epoch ``current_epoch + 1`` is measured, compared, logged, and freezing is decided.
* ``on_train_end``: the "final" reference, every measured epoch against the last snapshot.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_svcca.activations import (
    REDUCTIONS,
    ActivationRecorder,
    LayerSpec,
    layer_seed,
    probe_share,
    reduce_output,
    resolve_layers,
)
from lightning_svcca.distributed import StrategyCollective, buffers_from_rank_zero, shard
from lightning_svcca.freezing import (
    FreezeDecision,
    FreezePolicy,
    Freezer,
    freeze_blocks,
    is_hard_freeze_supported,
    rebuild_ddp_wrapper,
)
from lightning_svcca.probe import ForwardFn, Probe, batch_size, build_probe, run_probe
from lightning_svcca.references import Reference, check_reference_layers, device_of, parse_references, reference_model
from lightning_svcca.reporting import Reporter
from lightning_svcca.similarity import DATAPOINTS_PER_DIRECTION, SimilarityWarning, _check_keep
from lightning_svcca.snapshots import (
    METRICS,
    Collective,
    LocalCollective,
    Pair,
    Snapshot,
    SnapshotStore,
    build_snapshot,
    evaluate,
    pair_for,
)

__all__ = ["SVCCACallback", "SVCCAMonitorWarning"]

TIME_REFERENCES = ("previous", "initial", "final")
_COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "auto": None}
#: Metrics that a float32 decomposition computes accurately. The Gram route squares singular values, so float32
#: only resolves directions down to about 1% of the largest: CKA weights directions by their variance and barely
#: notices, but SVCCA's kept set (and so its value) can change by several hundredths on ill-conditioned layers.
_FLOAT32_SAFE_METRICS = ("linear_cka",)
_STATE_VERSION = 1


class SVCCAMonitorWarning(SimilarityWarning):
    """A recoverable problem of the monitor (a skipped layer, a small probe); training goes on."""


class _SVCCACallbackCore:
    """Measure how each layer's representation changes while the model trains, with SVCCA and friends.

    Every ``every_n_epochs`` epochs a fixed probe batch runs through the model; the activations of the chosen
    layers are compressed to snapshots and compared with references. Results go to ``history``, to
    ``svcca_history.csv`` in the log directory, and to the loggers (TensorBoard: per-layer curves
    ``{metric}/{reference}/{layer}``, heatmaps ``{metric}/{reference}/heatmap``, a custom-scalars layout). With
    ``freeze``, converged layers stop training, bottom-up.

    Args:
        probe: the probe: a tensor (the model input), a batch (tuple, list or dict of tensors), or a
            DataLoader (its first ``probe_size`` samples). ``None``: the first ``probe_size`` samples of the
            validation dataloader, else of the training one. Fixed for the whole run.
        layers: module names from ``model.named_modules()``, or ``{name: {"output": ..., "reduction": ...,
            "layout": ...}}`` for per-layer options (see :class:`~lightning_svcca.activations.LayerSpec`).
            ``None``: every Linear, Conv, RNN and Transformer layer, outermost first.
        reference: what each layer is compared with, one or several of: ``"previous"`` (the last measured
            epoch), ``"initial"`` (before training), ``"final"`` (at the end of fit, every epoch against the last
            one: the SVCCA paper's learning-dynamics plot), an ``nn.Module`` or a checkpoint path (a fixed model,
            e.g. the pretrained one being fine-tuned; layers matched by name), or a tensor of features aligned
            with the probe's samples (e.g. inputs or one-hot labels). Name fixed references with a dict
            ``{"pretrained": model}``; an unnamed one is called ``"reference"``.
        metrics: any of ``"svcca"``, ``"pwcca"``, ``"cca"`` (mean canonical correlation) and ``"linear_cka"``.
        every_n_epochs: measure every this many epochs (epoch 0 and the end of fit are always measured).
        freeze: a :class:`~lightning_svcca.freezing.FreezePolicy` to freeze converged layers, or ``None``.
        probe_size: samples taken from a DataLoader (and the cap for a tensor or batch probe).
        probe_batch_size: samples per forward pass of the probe.
        probe_input: the part of a batch that is the model input (index or key; default: element 0 of a tuple).
        probe_mask: the part of a batch holding a sequence padding mask ``(N, T)`` or lengths ``(N,)``.
        forward_fn: ``forward_fn(model, batch)`` for models whose ``forward`` does not take the probe input
            directly (e.g. ``lambda model, batch: model(**batch)``).
        reduction: default reduction of outputs with positions: ``"positions"`` (each conv position or
            sequence frame is a datapoint), ``"mean"`` or ``"flatten"``.
        max_datapoints: cap on datapoints per layer: each probe sample contributes at most
            ``max_datapoints // probe_size`` positions or frames (at least one).
        keep: SVCCA's ``keep`` (fraction of the singular value sum, or a number of directions).
        keep_by: ``"singular_values"`` (the paper's) or ``"variance"``.
        baseline: also log each metric on the probe with its datapoint pairing shuffled (the noise floor).
        max_snapshot_bytes: memory budget of the snapshot store; beyond it snapshots spill to files in the log
            directory (deleted at the end of fit). ``None``: unbounded.
        shard_probe: under DDP, each process runs its share of the probe and statistics are summed.
        compute_dtype: precision of the decompositions: ``"float64"``, ``"float32"``, or ``"auto"`` (default):
            float32 on a GPU when the only metric is linear_cka (accurate there, and much faster on GPUs with slow
            float64), float64 otherwise. float32 decompositions resolve directions only down to about 1% of the
            largest, which can shift SVCCA on layers whose spectrum spans several decades.
    """

    def __init__(
        self,
        probe: Tensor | Sequence[Any] | Mapping[str, Any] | DataLoader | None = None,
        layers: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
        reference: str | nn.Module | Tensor | Sequence[Any] | Mapping[str, Any] = ("previous", "final"),
        metrics: str | Sequence[str] = ("svcca",),
        every_n_epochs: int = 1,
        freeze: FreezePolicy | None = None,
        *,
        probe_size: int = 1024,
        probe_batch_size: int = 256,
        probe_input: int | str | None = None,
        probe_mask: int | str | None = None,
        forward_fn: ForwardFn | None = None,
        reduction: str = "positions",
        max_datapoints: int = 4096,
        keep: float | int = 0.99,
        keep_by: str = "singular_values",
        baseline: bool = True,
        max_snapshot_bytes: int | None = 1 << 30,
        shard_probe: bool = True,
        compute_dtype: str = "auto",
    ) -> None:
        super().__init__()
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        unknown = [metric for metric in metrics if metric not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"metrics must be a non-empty selection of {METRICS}, got {list(metrics)}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if freeze is not None and not isinstance(freeze, FreezePolicy):
            raise TypeError(f"freeze must be a FreezePolicy or None, got {type(freeze).__name__}")
        if freeze is not None and freeze.mode == "convergence" and freeze.lag % every_n_epochs:
            raise ValueError(
                f"FreezePolicy.lag={freeze.lag} must be a multiple of every_n_epochs={every_n_epochs}: convergence"
                " compares a layer with its snapshot lag epochs earlier, so that epoch must be measured"
            )
        if freeze is not None and freeze.mode == "convergence" and freeze.metric not in metrics:
            raise ValueError(
                f"FreezePolicy(metric={freeze.metric!r}) judges convergence by a metric the callback does not"
                f" measure; add it: metrics={(*metrics, freeze.metric)}"
            )
        if freeze is not None and freeze.noise_aware and not baseline:
            raise ValueError("FreezePolicy(noise_aware=True) needs the shuffled baseline: keep baseline=True")
        for name, value in (("probe_size", probe_size), ("probe_batch_size", probe_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_datapoints < 2:
            raise ValueError(f"max_datapoints must be >= 2, got {max_datapoints}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {tuple(_COMPUTE_DTYPES)}, got {compute_dtype!r}")
        _check_keep(keep, keep_by)
        self._probe_source = probe
        self._layers_argument = layers
        self._references = parse_references(reference)
        self.metrics = metrics
        self.every_n_epochs = every_n_epochs
        self.freeze_policy = freeze
        self.probe_size = probe_size
        self.probe_batch_size = probe_batch_size
        self.probe_input = probe_input
        self.probe_mask = probe_mask
        self.forward_fn = forward_fn
        self.reduction = reduction
        self.max_datapoints = max_datapoints
        self.keep = keep
        self.keep_by = keep_by
        self.baseline = baseline
        self.shard_probe = shard_probe
        self.compute_dtype = compute_dtype
        #: The reference a convergence policy judges by: a layer's snapshot ``lag`` epochs earlier.
        self._lag_reference: str | None = None
        if freeze is not None and freeze.mode == "convergence":
            self._lag_reference = "previous" if freeze.lag == every_n_epochs else f"lag{freeze.lag}"
            if self._lag_reference not in self.reference_names:
                self._references.append(Reference(self._lag_reference, "lag", lag=freeze.lag))
        #: Every measured value: dicts with keys epoch, layer, reference, metric, value.
        self.history: list[dict[str, Any]] = []
        #: Frozen layers -> the epoch at which they froze.
        self.frozen: dict[str, int] = {}
        #: Layers skipped at some epoch: (epoch, layer, reason).
        self.skipped: list[tuple[int, str, str]] = []
        self._store = SnapshotStore(max_snapshot_bytes, self._spill_dir)
        self._freezer = Freezer(policy=freeze, spill_dir=self._spill_dir)
        self._streaks: dict[str, int] = {}
        self._measured: list[int] = []
        self._layer_order: list[str] = []
        self._specs: list[LayerSpec] = []
        self._probe: Probe | None = None
        self._probe_fingerprint: str | None = None
        self._last_measured_step = -1
        self._log_dir: Path | None = None
        self._reporter: Reporter | None = None
        self._warned: set[str] = set()
        self._shuffles: dict[int, Tensor] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Public read-only views
    # ------------------------------------------------------------------------------------------------------------

    @property
    def reference_names(self) -> list[str]:
        """Names of the references, as they appear in the history and the tags."""
        return [reference.name for reference in self._references]

    @property
    def layers(self) -> list[str]:
        """Monitored layers in bottom-up (forward) order, known after the first probe."""
        return list(self._layer_order) or [spec.name for spec in self._specs]

    @property
    def state_key(self) -> str:
        """Checkpoint key; differs between instances with different layers, references, metrics or probe shapes."""
        return self._generate_state_key(
            layers=None if self._layers_argument is None else list(self._layers_argument),
            reference=self.reference_names,
            metrics=list(self.metrics),
            probe=_describe_probe(self._probe_source, self.probe_size),
        )

    # ------------------------------------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Check layers, references and the freeze policy against the model, before anything runs."""
        if stage != "fit":
            return
        self._specs = resolve_layers(pl_module, self._layers_argument, self.reduction)  # type: ignore[arg-type]
        names = [spec.name for spec in self._specs]
        for reference in self._references:
            if reference.kind == "module":
                check_reference_layers(reference, names)
            elif reference.kind == "checkpoint" and not Path(reference.source).is_file():
                raise FileNotFoundError(f"reference {reference.name!r}: no checkpoint file at {reference.source}")
        policy = self.freeze_policy
        if policy is not None and policy.mode == "schedule":
            unknown = sorted(set(policy.schedule or {}) - set(names))
            if unknown:
                raise ValueError(
                    f"FreezePolicy.schedule names layers that are not monitored: {unknown}; monitored: {names}"
                )
        if policy is not None and policy.mode == "linear" and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise ValueError("FreezePolicy(mode='linear') spreads freezes over max_epochs: set Trainer(max_epochs=...)")

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        """Decide how freezing works on this strategy, and re-apply freezes restored from a checkpoint."""
        if self.freeze_policy is None and not self._freezer.parameters:
            return
        self._freezer.hard = is_hard_freeze_supported(trainer.strategy)
        if not self._freezer.hard:
            self._warn_once(
                "soft-freeze",
                f"freezing on {type(trainer.strategy).__name__} keeps frozen parameters fixed by dropping their"
                " gradients before each optimizer step; the backward pass still computes them, so no compute is"
                " saved. Hard freezing (requires_grad off) works on single-device and DDP strategies",
                trainer,
            )
        if self._freezer.parameters:
            self._freezer.apply(pl_module, norms=False)
            if self._freezer.hard:
                rebuild_ddp_wrapper(trainer.strategy)

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        """Build the probe and take the epoch-0 snapshot (unless resuming)."""
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._reporter = Reporter(trainer.loggers if trainer.is_global_zero else [], self._log_dir)
        self._build_probe(trainer)
        if not self._measured:
            self._measure(trainer, pl_module, 0)
        else:
            self._snapshot_fixed_references(trainer, pl_module)
        if trainer.is_global_zero:
            charts = [(metric, name) for metric in self.metrics for name in self._chart_references()]
            charts += [("svcca", "dims")] + ([("svcca", "frozen")] if self.freeze_policy is not None else [])
            self._reporter.layout(charts, self.layers)

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        """Keep frozen BatchNorm layers in eval mode whatever ``model.train()`` did; tell the prefix cache the epoch."""
        self._freezer.start_batch(pl_module, int(trainer.current_epoch))

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        """Soft freezing only: drop the frozen parameters' gradients."""
        if not self._freezer.hard and self._freezer.parameters:
            self._freezer.drop_gradients(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Measure at the end of the epoch's last batch: before validation and checkpointing."""
        if _is_last_batch(trainer, batch_idx):
            self._end_of_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Measure here when the last batch was not recognisable (iterable data, ``max_steps``)."""
        self._end_of_epoch(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Measure the final weights if needed, and compare every measured epoch with them."""
        if self._probe is None:
            return
        if trainer.global_step > self._last_measured_step or not self._measured:
            last = self._measured[-1] if self._measured else -1
            self._measure(trainer, pl_module, max(int(trainer.current_epoch), last + 1), decide_freezes=False)
        if self._wants_final:
            rows = self._compare_with_epoch(trainer, self._measured[-1], "final")
            self.history.extend(rows)
            self._report(trainer, rows, self._measured[-1], {"final": self.history})
        if self._reporter is not None:
            self._reporter.flush()

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Delete spilled snapshot files."""
        self._store.close()

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        """Delete spilled snapshot files when the fit fails."""
        self._store.close()

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Delete spilled snapshot files (also after interrupted fits)."""
        if stage == "fit":
            self._store.close()
            self._freezer.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: history, freezes, policy counters, snapshots."""
        return {
            "version": _STATE_VERSION,
            "history": [dict(row) for row in self.history],
            "frozen": dict(self.frozen),
            "streaks": dict(self._streaks),
            "freezer": self._freezer.state_dict(),
            "measured": list(self._measured),
            "layer_order": list(self._layer_order),
            "last_measured_step": self._last_measured_step,
            "probe_fingerprint": self._probe_fingerprint,
            "snapshots": self._store.state_dict(),
            "skipped": [list(entry) for entry in self.skipped],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (keys missing from older checkpoints take their defaults)."""
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self.frozen = dict(state_dict.get("frozen", {}))
        self._streaks = dict(state_dict.get("streaks", {}))
        self._freezer.load_state_dict(state_dict.get("freezer", {}))
        self._measured = list(state_dict.get("measured", []))
        self._layer_order = list(state_dict.get("layer_order", []))
        self._last_measured_step = int(state_dict.get("last_measured_step", -1))
        self._probe_fingerprint = state_dict.get("probe_fingerprint")
        self._store.load_state_dict(state_dict.get("snapshots", {}))
        self.skipped = [tuple(entry) for entry in state_dict.get("skipped", [])]

    # ------------------------------------------------------------------------------------------------------------
    # Measuring
    # ------------------------------------------------------------------------------------------------------------

    def _end_of_epoch(self, trainer: Any, pl_module: nn.Module) -> None:
        epoch = int(trainer.current_epoch) + 1
        if self._probe is None or epoch in self._measured or epoch % self.every_n_epochs:
            return
        if trainer.global_step <= self._last_measured_step:
            return  # no training step since the last measurement (e.g. an empty epoch)
        self._measure(trainer, pl_module, epoch)

    def _measure(self, trainer: Any, pl_module: nn.Module, epoch: int, *, decide_freezes: bool = True) -> None:
        """Snapshot every layer at ``epoch``, compare with the references, log, and decide freezes."""
        recorder = self._record(trainer, pl_module, pl_module)
        layers = self._settle_layer_order(trainer, recorder)
        snapshots = self._snapshots_from(trainer, recorder, layers, epoch, label=f"epoch {epoch}")
        if not self._measured:
            self._snapshot_fixed_references(trainer, pl_module, recorder)
        rows = self._compare(trainer, epoch, snapshots)
        for layer, snapshot in snapshots.items():
            self._store.put((layer, str(epoch)), snapshot)
        self._measured.append(epoch)
        self._last_measured_step = int(trainer.global_step)
        if self.freeze_policy is not None and decide_freezes:
            self._decide_and_freeze(trainer, pl_module, recorder, epoch, rows)
        if self.freeze_policy is not None or self.frozen:
            rows += [_row(epoch, layer, "frozen", "svcca", float(layer in self.frozen)) for layer in self.layers]
        self.history.extend(rows)
        self._prune(epoch)
        # heatmaps of the references the user asked for (a freeze policy's lag reference is only charted)
        heatmaps = {ref.name: self.history for ref in self._references if ref.kind not in ("final", "lag")}
        if self._wants_final and epoch > 0:
            # the learning-dynamics picture so far: every epoch against the latest one (not kept in the history)
            heatmaps["final"] = self._compare_with_epoch(trainer, epoch, "final")
        self._report(trainer, rows, epoch, heatmaps)

    def _record(self, trainer: Any, pl_module: nn.Module, model: nn.Module) -> ActivationRecorder:
        """Run this process's share of the probe through ``model`` with hooks on the monitored layers."""
        assert self._probe is not None
        collective = self._collective(trainer)
        start, stop = shard(self._probe.size, collective)
        mask_frames = None
        if self._probe.mask_key is not None:
            mask = self._probe.batch[self._probe.mask_key]
            mask_frames = int(mask.shape[1]) if mask.ndim == 2 else None
        recorder = ActivationRecorder(
            model,
            self._specs,
            per_sample=probe_share(self.max_datapoints, self._probe.size),
            mask_frames=mask_frames,
        )
        device = device_of(pl_module)
        probe = self._probe

        def before_chunk(first: int, chunk: Any) -> None:
            recorder.start_chunk(first, probe.lengths(chunk), batch_size(chunk), device)

        context = getattr(getattr(trainer, "precision_plugin", None), "forward_context", None)
        with buffers_from_rank_zero(model, collective), recorder:
            run_probe(
                model,
                probe,
                chunk_size=self.probe_batch_size,
                device=device,
                forward_fn=self.forward_fn,
                start=start,
                stop=stop,
                before_chunk=before_chunk,
                forward_context=context,
            )
        return recorder

    def _settle_layer_order(self, trainer: Any, recorder: ActivationRecorder) -> list[str]:
        """Bottom-up order from the first probe; layers that did not run are dropped with a warning."""
        if not self._layer_order:
            ran = [name for name in recorder.order if name in {spec.name for spec in self._specs}]
            missing = [spec.name for spec in self._specs if spec.name not in ran]
            if missing and self._layers_argument is not None:
                self._warn_once(
                    "did-not-run",
                    f"layers {missing} did not run in the probe's forward pass and are not monitored; check the"
                    " names, probe_input or forward_fn",
                    trainer,
                )
            if not ran:
                raise RuntimeError(
                    "none of the monitored layers ran in the probe's forward pass: check layers, probe_input and"
                    " forward_fn (the default calls model(probe_input))"
                )
            self._layer_order = ran
        return self._layer_order

    def _snapshots_from(
        self, trainer: Any, recorder: ActivationRecorder, layers: Sequence[str], epoch: int, *, label: str
    ) -> dict[str, Snapshot]:
        """Build one snapshot per layer; a layer that fails is skipped with a warning."""
        collective = self._collective(trainer)
        ran = [float(layer in recorder.activations) for layer in layers]
        present = collective.sum(torch.tensor(ran, device=device_of(trainer.lightning_module)))
        snapshots = {}
        for layer, count in zip(layers, present.tolist(), strict=True):
            if count < collective.world_size:
                self._skip(trainer, epoch, layer, f"it did not run in the probe ({label})")
                continue
            snapshot = self._build(trainer, recorder.activations[layer], recorder.input_eps[layer], layer, epoch, label)
            if snapshot is not None:
                snapshots[layer] = snapshot
        return snapshots

    def _build(
        self, trainer: Any, rows: Tensor, input_eps: float, layer: str, epoch: int, label: str
    ) -> Snapshot | None:
        try:
            snapshot = build_snapshot(
                rows,
                self._collective(trainer),
                name=layer,
                keep=self.keep,
                keep_by=self.keep_by,
                full_rank=any(metric != "svcca" for metric in self.metrics),
                with_right="pwcca" in self.metrics,
                input_eps=input_eps,
                dtype=self._dtype(trainer),
            )
        except ValueError as error:  # ZeroVarianceError (a dead layer) included: skip the layer, train on
            self._skip(trainer, epoch, layer, f"{error} ({label})")
            return None
        recommended = DATAPOINTS_PER_DIRECTION * snapshot.kept
        if snapshot.n_datapoints < recommended:
            self._warn_once(
                f"few-datapoints:{layer}",
                f"layer {layer!r}: SVCCA keeps {snapshot.kept} directions but the probe gives {snapshot.n_datapoints}"
                f" datapoints; at least {recommended} are recommended ({DATAPOINTS_PER_DIRECTION} per direction),"
                " or similarities are biased towards 1. Raise probe_size (or max_datapoints for conv and sequence"
                " layers); the baseline tag shows the bias",
                trainer,
            )
        return snapshot

    def _snapshot_fixed_references(
        self, trainer: Any, pl_module: nn.Module, recorder: ActivationRecorder | None = None
    ) -> None:
        """Snapshot each fixed reference once per layer (restored from checkpoints afterwards)."""
        for reference in self._references:
            if not reference.fixed or all((layer, reference.name) in self._store for layer in self.layers):
                continue
            label = f"reference {reference.name!r}"
            if reference.kind == "tensor":
                if recorder is None:
                    recorder = self._record(trainer, pl_module, pl_module)
                snapshots = self._tensor_reference_snapshots(trainer, reference, recorder)
            else:
                with reference_model(reference, pl_module) as model:
                    reference_recorder = self._record(trainer, pl_module, model)
                snapshots = self._snapshots_from(trainer, reference_recorder, self.layers, 0, label=label)
            for layer, snapshot in snapshots.items():
                self._store.put((layer, reference.name), snapshot)

    def _tensor_reference_snapshots(
        self, trainer: Any, reference: Reference, recorder: ActivationRecorder
    ) -> dict[str, Snapshot]:
        """Features aligned with the probe's samples, laid out like each layer's rows."""
        assert self._probe is not None
        features: Tensor = reference.source
        if features.shape[0] != self._probe.size:
            raise ValueError(
                f"reference {reference.name!r} has {features.shape[0]} rows but the probe has {self._probe.size}"
                " samples: a feature reference needs one row per probe sample, in probe order"
            )
        start, stop = shard(self._probe.size, self._collective(trainer))
        snapshots = {}
        for layer in self.layers:
            if layer not in recorder.sample_ids:
                continue
            sample_ids = recorder.sample_ids[layer]
            if features.ndim <= 2 or recorder.output_ndim.get(layer, 2) <= 2:
                table = features.reshape(features.shape[0], -1).to(sample_ids.device)
                rows = table[sample_ids]
            else:
                spec = next(spec for spec in self._specs if spec.name == layer)
                lengths = None if self._probe.mask_key is None else self._probe.lengths(self._probe.batch)[start:stop]
                rows, _ = reduce_output(
                    features[start:stop].to(sample_ids.device),
                    layout=recorder.layouts[layer],
                    reduction=spec.reduction,
                    sample_ids=torch.arange(start, stop, device=sample_ids.device),
                    per_sample=recorder.per_sample,
                    seed=layer_seed(layer),
                    lengths=lengths,
                    mask_frames=recorder.mask_frames,
                )
                if rows.shape[0] != sample_ids.shape[0]:
                    self._skip(
                        trainer,
                        0,
                        layer,
                        f"reference {reference.name!r} reduces to {rows.shape[0]} rows but the layer has"
                        f" {sample_ids.shape[0]}: its positions or frames do not line up with the layer's",
                    )
                    continue
            eps = torch.finfo(rows.dtype).eps if rows.is_floating_point() else 0.0
            snapshot = self._build(trainer, rows.to(torch.float64), eps, layer, 0, f"reference {reference.name!r}")
            if snapshot is not None:
                snapshots[layer] = snapshot
        return snapshots

    def _compare(self, trainer: Any, epoch: int, snapshots: Mapping[str, Snapshot]) -> list[dict[str, Any]]:
        """History rows of this measurement: each layer against each available reference, dims and baselines."""
        jobs: list[tuple[dict[str, Any], str, Pair]] = []
        rows = []
        for layer, snapshot in snapshots.items():
            rows.append(_row(epoch, layer, "dims", "svcca", float(snapshot.kept)))
            for reference in self._references:
                other = self._reference_snapshot(reference, layer, epoch)
                if other is None:
                    continue
                for metric in self.metrics:
                    jobs.append(
                        (
                            _row(epoch, layer, reference.name, metric, math.nan),
                            metric,
                            pair_for(metric, snapshot, other),
                        )
                    )
            if self.baseline:
                shuffle = self._shuffle(snapshot.n_datapoints)
                for metric in self.metrics:
                    pair = pair_for(metric, snapshot, snapshot, shuffle)
                    jobs.append((_row(epoch, layer, "baseline", metric, math.nan), metric, pair))
        return rows + self._evaluate(trainer, jobs)

    def _compare_with_epoch(self, trainer: Any, target: int, name: str) -> list[dict[str, Any]]:
        """Every measured epoch's snapshot against epoch ``target``'s, as rows for reference ``name``."""
        rows = []
        for layer in self.layers:
            key = (layer, str(target))
            if key not in self._store:
                continue
            latest = self._store.get(key)
            jobs = []
            for epoch in self._measured:
                if epoch > target or (layer, str(epoch)) not in self._store:
                    continue
                snapshot = self._store.get((layer, str(epoch)))
                for metric in self.metrics:
                    jobs.append(
                        (_row(epoch, layer, name, metric, math.nan), metric, pair_for(metric, snapshot, latest))
                    )
            rows += self._evaluate(trainer, jobs)
        return rows

    def _evaluate(self, trainer: Any, jobs: Sequence[tuple[dict[str, Any], str, Pair]]) -> list[dict[str, Any]]:
        """Fill in the value of each job's row (rows whose value is not finite are dropped)."""
        device = device_of(trainer.lightning_module)
        values = evaluate(
            [(metric, pair) for _, metric, pair in jobs],
            self._collective(trainer),
            device=device,
            dtype=self._dtype(trainer),
        )
        return [
            {**row, "value": value} for (row, _, _), value in zip(jobs, values, strict=True) if math.isfinite(value)
        ]

    def _reference_snapshot(self, reference: Reference, layer: str, epoch: int) -> Snapshot | None:
        """The snapshot a layer is compared with at ``epoch``, or ``None`` when there is none (yet)."""
        if reference.kind == "final":
            return None  # compared at the end of fit (and live, for the heatmap)
        if reference.fixed:
            key = (layer, reference.name)
        elif reference.kind == "initial":
            key = (layer, "0")
        elif reference.kind == "previous":
            earlier = [e for e in self._measured if e < epoch]
            if not earlier:
                return None
            key = (layer, str(earlier[-1]))
        else:  # lag
            key = (layer, str(epoch - reference.lag))
        if epoch == 0 and not reference.fixed:
            return None
        return self._store.get(key) if key in self._store else None

    def _prune(self, epoch: int) -> None:
        """Forget epoch snapshots no reference will need again."""
        if self._wants_final:
            return  # the final pass needs every epoch
        lags = [reference.lag for reference in self._references if reference.kind == "lag"]
        horizon = max(lags, default=0)
        for layer, tag in self._store.keys():
            if not tag.isdigit():
                continue
            stored = int(tag)
            needed = stored == epoch or stored > epoch - horizon
            if stored == 0 and any(reference.kind == "initial" for reference in self._references):
                needed = True
            if not needed:
                self._store.discard((layer, tag))

    def _shuffle(self, n: int) -> Tensor:
        """The fixed datapoint permutation of the noise baseline (seeded: the same on every process and run)."""
        if n not in self._shuffles:
            self._shuffles[n] = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        return self._shuffles[n]

    # ------------------------------------------------------------------------------------------------------------
    # Freezing
    # ------------------------------------------------------------------------------------------------------------

    def _decide_and_freeze(
        self, trainer: Any, pl_module: nn.Module, recorder: ActivationRecorder, epoch: int, rows: list[dict[str, Any]]
    ) -> None:
        """Decide on rank zero, broadcast, apply on every process at the same step."""
        policy = self.freeze_policy
        assert policy is not None
        decisions: list[FreezeDecision] = []
        if trainer.is_global_zero:
            similarities = _values(rows, self._lag_reference, policy.metric)
            baselines = _values(rows, "baseline", policy.metric)
            decisions = policy.decide(
                epoch, self.layers, self.frozen, self._streaks, similarities, baselines, trainer.max_epochs
            )
        decisions, self._streaks = trainer.strategy.broadcast((decisions, self._streaks), src=0)
        if not decisions:
            return
        blocks = freeze_blocks(recorder.completion, self.layers, pl_module)
        for decision in decisions:
            block = blocks[decision.layer]
            if not self._freezer.leaves_trainable(pl_module, block):
                self._warn_once(
                    "freeze-all",
                    f"the freeze policy would freeze every trainable parameter at layer {decision.layer!r}; it stops"
                    " one short and that layer keeps training. Use FreezePolicy(keep_last=1) or more",
                    trainer,
                )
                break
            self._freezer.freeze(pl_module, decision.layer, block)
            self.frozen[decision.layer] = epoch
            if not block.parameters:  # nothing of its own to freeze: noted, not reported as a freeze
                self._logger().debug(f"layer {decision.layer!r} has no parameters of its own: {decision.reason}")
                continue
            count = len(block.parameters)
            message = (
                f"froze layer {decision.layer!r} at epoch {epoch} ({count} parameter tensor{'s' * (count != 1)}):"
                f" {decision.reason}"
            )
            if trainer.is_global_zero:
                self._logger().info(message)
                if self._reporter is not None:
                    self._reporter.text("svcca/freeze", message, epoch)
        if self._freezer.hard:
            rebuild_ddp_wrapper(trainer.strategy)

    # ------------------------------------------------------------------------------------------------------------
    # Reporting and plumbing
    # ------------------------------------------------------------------------------------------------------------

    def _report(
        self, trainer: Any, rows: list[dict[str, Any]], epoch: int, heatmaps: Mapping[str, Sequence[dict[str, Any]]]
    ) -> None:
        """On rank zero: rows as scalars, a heatmap per reference (drawn from the rows given for it), the CSV."""
        if not trainer.is_global_zero or self._reporter is None:
            return
        self._reporter.scalars(rows)
        for reference, source in heatmaps.items():
            for metric in self.metrics:
                self._reporter.heatmap(source, reference=reference, metric=metric, layers=self.layers, step=epoch)
        self._reporter.write_csv(self.history)

    @property
    def _wants_final(self) -> bool:
        return any(reference.kind == "final" for reference in self._references)

    def _chart_references(self) -> list[str]:
        return self.reference_names + (["baseline"] if self.baseline else [])

    def _build_probe(self, trainer: Any) -> None:
        source = self._probe_source
        size: int | None = self.probe_size
        if source is None:
            source = _default_probe_loader(trainer)
        self._probe = build_probe(
            source, size, input_key=self.probe_input, mask_key=self.probe_mask, needs_input=self.forward_fn is None
        )
        fingerprint = self._probe.fingerprint()
        if self._probe_fingerprint is not None and fingerprint != self._probe_fingerprint and self._store.keys():
            self._warn_once(
                "probe-changed",
                "the probe differs from the one in the checkpoint, so earlier snapshots describe other datapoints;"
                " they are dropped (history and freezes are kept) and comparisons start again from this epoch",
                trainer,
            )
            for key in self._store.keys():
                self._store.discard(key)
            self._measured.clear()
        self._probe_fingerprint = fingerprint
        if self._probe.size < 2:
            raise ValueError(f"the probe has {self._probe.size} sample(s); it needs at least 2")

    def _dtype(self, trainer: Any) -> torch.dtype:
        """The decomposition precision: ``compute_dtype``, with ``"auto"`` resolved for the model's device."""
        chosen = _COMPUTE_DTYPES[self.compute_dtype]
        if chosen is not None:
            return chosen
        on_gpu = device_of(trainer.lightning_module).type == "cuda"
        return torch.float32 if on_gpu and set(self.metrics) <= set(_FLOAT32_SAFE_METRICS) else torch.float64

    def _collective(self, trainer: Any) -> Collective:
        strategy = trainer.strategy
        world_size = int(getattr(strategy, "world_size", 1))
        if world_size < 2 or not self.shard_probe or self._probe is None or self._probe.size < 2 * world_size:
            return LocalCollective()
        return StrategyCollective(strategy)

    def _skip(self, trainer: Any, epoch: int, layer: str, reason: str) -> None:
        self.skipped.append((epoch, layer, reason))
        self._warn_once(
            f"skip:{layer}:{reason.split(':')[0][:40]}",
            f"layer {layer!r} skipped at epoch {epoch}: {reason}. Training goes on; later epochs with the same"
            " problem are listed in callback.skipped without a new warning",
            trainer,
        )

    def _warn_once(self, key: str, message: str, trainer: Any) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        if getattr(trainer, "is_global_zero", True):
            warnings.warn(message, SVCCAMonitorWarning, stacklevel=2)

    def _logger(self) -> logging.Logger:
        """A logger under the Lightning namespace this callback belongs to, so its console handler shows it."""
        for base in type(self).__mro__:
            if base.__name__ == "Callback" and base.__module__ != __name__:
                return logging.getLogger(base.__module__.rsplit(".", 1)[0] + ".svcca")
        return logging.getLogger("lightning_svcca")

    def _spill_dir(self) -> Path:
        root = self._log_dir or Path.cwd()
        return root / f".svcca_snapshots_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def _default_probe_loader(trainer: Any) -> Any:
    """The validation dataloader if there is one, else the training one (unwrapped, as the user defined it)."""
    val_source = trainer.fit_loop.epoch_loop.val_loop._data_source
    if val_source.instance is not None and val_source.is_defined():
        loader = val_source.dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, DataLoader):
            return loader
    train = trainer.fit_loop._data_source.dataloader()
    if isinstance(train, (list, tuple)):
        train = train[0]
    if isinstance(train, Mapping):
        train = next(iter(train.values()))
    if not isinstance(train, DataLoader):
        raise ValueError("no probe given and no DataLoader to take one from: pass probe=<tensor, batch or DataLoader>")
    return train


def _is_last_batch(trainer: Any, batch_idx: int) -> bool:
    total = trainer.num_training_batches
    if isinstance(total, (int, float)) and math.isfinite(total) and batch_idx + 1 >= total:
        return True
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False))


def _describe_probe(probe: Any, size: int) -> str:
    """A stable, cheap description of the probe argument (its kind and tensor shapes, not its contents)."""
    if probe is None or isinstance(probe, DataLoader):
        return f"{'loader' if probe is not None else 'default'}:{size}"
    if isinstance(probe, Tensor):
        return f"tensor:{tuple(probe.shape)}"
    if isinstance(probe, Mapping):
        return "dict:" + ",".join(f"{k}{tuple(v.shape) if isinstance(v, Tensor) else ''}" for k, v in probe.items())
    return f"{type(probe).__name__}:" + ",".join(str(tuple(v.shape)) for v in probe if isinstance(v, Tensor))


def _values(rows: Sequence[Mapping[str, Any]], reference: str | None, metric: str) -> dict[str, float]:
    """Layer -> value of the rows of one reference and metric."""
    return {row["layer"]: row["value"] for row in rows if row["reference"] == reference and row["metric"] == metric}


def _row(epoch: int, layer: str, reference: str, metric: str, value: float) -> dict[str, Any]:
    return {"epoch": int(epoch), "layer": layer, "reference": reference, "metric": metric, "value": float(value)}


class SVCCACallback(_SVCCACallbackCore, pl.Callback):  # noqa: D101 - the docstring is the core's
    __doc__ = _SVCCACallbackCore.__doc__
