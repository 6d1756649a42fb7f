"""SVCCACallback: the Lightning glue around :class:`~lightning_svcca.monitoring.monitor.SVCCAMonitor`.

Each hook maps to monitor calls; the strategy becomes the monitor's collective and broadcast, the loggers its
writers, the checkpoint its state. :class:`_SVCCACallbackCore` uses the trainer only through attributes both
Lightning namespaces share; :class:`SVCCACallback` combines it with ``pytorch_lightning.Callback`` and
``lightning_svcca.integrations.lightning.SVCCACallback`` with ``lightning.pytorch.Callback``.

When things happen in a fit:

* ``setup``: the monitor is built for this fit: layer names, references and the freeze policy are checked against
  the model.
* ``on_fit_start``: the probe is built (so a bad probe fails before the sanity check); freezes restored from a
  checkpoint are applied again (before any training step).
* ``on_train_start``: epoch 0 is measured (the "initial" snapshot) and fixed references are snapshotted.
* end of each training epoch, on its last batch (so before validation and before ``ModelCheckpoint`` saves):
  epoch ``current_epoch + 1`` is measured, compared, logged, and freezing is decided.
* ``on_train_end``: the "final" reference, every measured epoch against the last snapshot.

A measurement's epoch is the number of epochs this fit has COMPLETED, as the HuggingFace adapter's: a fit stopped
in the middle of an epoch (``max_steps``, ``should_stop``) labels its last measurement with the epochs before it,
although Lightning's ``current_epoch`` then already counts the cut-short one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import Unpack, override

from lightning_svcca.core.rows import LAYER_FACTS
from lightning_svcca.freezing.policy import FreezePolicy
from lightning_svcca.freezing.sharded import resharding, soft_freeze_message
from lightning_svcca.freezing.strategies import is_hard_freeze_supported, rebuild_ddp_wrapper
from lightning_svcca.integrations.resume import describe_changes, orphaned_state
from lightning_svcca.monitoring.config import (
    LayersArg,
    MetricsArg,
    MonitorConfig,
    MonitorOptions,
    ProbeArg,
    ReferenceArg,
)
from lightning_svcca.monitoring.monitor import Runtime, SVCCAMonitor, SVCCAMonitorWarning
from lightning_svcca.monitoring.options import monitor_config, takes_monitor_options
from lightning_svcca.monitoring.state_checks import integer_field
from lightning_svcca.output.reporting import tag
from lightning_svcca.pipeline.distributed import StrategyCollective
from lightning_svcca.pipeline.snapshot import LocalCollective

__all__ = ["SVCCACallback", "SVCCAMonitorWarning"]

if TYPE_CHECKING:
    # what a type checker checks the hooks' ``@override`` against: Lightning's Callback (both namespaces' hooks
    # have the same names and arguments); at runtime the core has no base, each namespace's class adds its own
    _CallbackBase = pl.Callback
else:
    _CallbackBase = object


@takes_monitor_options()
class _SVCCACallbackCore(_CallbackBase):
    """Measure how each layer's representation changes while the model trains, with SVCCA and friends.

    Every ``every_n_epochs`` epochs a fixed probe batch runs through the model; the activations of the chosen
    layers are compressed to snapshots and compared with references. Results go to ``history``, to
    ``svcca_history.csv`` in the log directory, and to the loggers (TensorBoard: per-layer curves
    ``{metric}/{reference}/{layer}``, heatmaps ``{metric}/{reference}/heatmap``, a custom-scalars layout). With
    ``freeze``, converged layers stop training, bottom-up.

    Every option of :class:`~lightning_svcca.monitoring.config.MonitorConfig` is an argument (the first six also by
    position), plus the callback's own ``probe_autocast``.

    Args:
        probe_autocast: under ``*-mixed`` precision, run the probe under the trainer's autocast, measuring the
            activations the mixed-precision forward pass computes. Default ``False``: the probe runs without
            autocast, so the values are those of a float32 probe on the same weights.
    """

    def __init__(
        self,
        probe: ProbeArg = None,
        layers: LayersArg = None,
        reference: ReferenceArg = ("previous", "final"),
        metrics: MetricsArg = ("svcca",),
        every_n_epochs: int | None = 1,
        freeze: FreezePolicy | None = None,
        *,
        probe_autocast: bool = False,
        **options: Unpack[MonitorOptions],
    ) -> None:
        super().__init__()
        #: The checked options (:class:`~lightning_svcca.monitoring.config.MonitorConfig`).
        self.config = monitor_config(type(self), probe, layers, reference, metrics, every_n_epochs, freeze, **options)
        self.probe_autocast = probe_autocast
        #: The monitor of the current fit (built in ``setup``).
        self.monitor: SVCCAMonitor | None = None
        self._pending_state: Mapping[str, Any] | None = None
        #: Epochs the trainer had completed when this fit started (a second fit numbers its own epochs from 0).
        self._epoch_offset = 0
        #: ``(config, key)``: :attr:`state_key` computed for that config object.
        self._state_key_of: tuple[MonitorConfig, str] | None = None
        self._trained = True  # whether this fit reached on_train_start (set in setup)
        self._warned_stages: set[str] = set()

    # ------------------------------------------------------------------------------------------------------------
    # Public read-only views (the monitor's, or empty before the first fit)
    # ------------------------------------------------------------------------------------------------------------

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every measured value: dicts with keys epoch, layer, reference, metric, value."""
        return self.monitor.history if self.monitor is not None else list(self._pending("history", []))

    @property
    def frozen(self) -> dict[str, int]:
        """Frozen layers -> the epoch at which they froze."""
        return self.monitor.frozen if self.monitor is not None else dict(self._pending("frozen", {}))

    @property
    def skipped(self) -> list[tuple[int, str, str]]:
        """Layers skipped at some epoch: (epoch, layer, reason)."""
        return self.monitor.skipped if self.monitor is not None else []

    @property
    def layers(self) -> list[str]:
        """Monitored layers in bottom-up (forward) order, known after the first probe."""
        return self.monitor.layers if self.monitor is not None else list(self._pending("layer_order", []))

    @property
    def reference_names(self) -> list[str]:
        """Names of the references, as they appear in the history and the tags."""
        return self.config.reference_names

    @property
    def metrics(self) -> tuple[str, ...]:
        """The measured metrics."""
        return tuple(self.config.metrics)

    @property
    def freeze_policy(self) -> FreezePolicy | None:
        """The freeze policy, or ``None``."""
        return self.config.freeze

    @property
    @override
    def state_key(self) -> str:
        """Checkpoint key; differs between instances with different layers, references, metrics or probe shapes.

        Kept per config object: Lightning asks for it at every hook call (profiler names), and describing a probe
        batch each time cost 0.3% of a BERT fine-tune.
        """
        config = self.config
        cached = self._state_key_of
        if cached is None or cached[0] is not config:
            key = self._generate_state_key(
                layers=None if config.layers is None else list(config.layers),
                reference=config.reference_names,
                metrics=list(config.metrics),
                probe=_describe_probe(config.probe, config.probe_size),
            )
            cached = self._state_key_of = (config, key)
        return cached[1]

    # ------------------------------------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Build this fit's monitor: layers, references and the freeze policy are checked against the model.

        Every ``fit`` is a run of its own (a second fit of the same callback starts a new history), unless it
        resumes from a checkpoint, whose state ``load_state_dict`` hands to the monitor built here.
        """
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn (a str enum): "validate", ...
        if stage != "fit":  # validate or test alone measure nothing; after a fit, they are the usual evaluation
            if stage not in self._warned_stages and self.monitor is None and trainer.is_global_zero:
                self._warned_stages.add(stage)
                warnings.warn(
                    f"SVCCACallback measures during Trainer.fit only; this {stage} run records nothing",
                    SVCCAMonitorWarning,
                    stacklevel=2,
                )
            return
        policy = self.config.freeze
        if policy is not None:
            policy.rule.check_fit(trainer.max_epochs)
        self._close_monitor()
        self._trained = False  # until on_train_start: a finished run resumed never gets there
        self._epoch_offset = int(trainer.current_epoch)
        debugging = bool(getattr(trainer, "fast_dev_run", False))  # Lightning writes no logs then; neither do we
        self.monitor = SVCCAMonitor.from_config(
            pl_module,
            _with_probe(self.config, lambda: _default_probe_loader(trainer)),
            writers=trainer.loggers if trainer.is_global_zero and not debugging else [],
            log_dir=None if debugging else _run_folder(trainer),
            runtime=_runtime(trainer, self._logger(), autocast=self.probe_autocast),
        )
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    @override
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        """Build the probe, and re-apply freezes restored from a checkpoint (before any training step)."""
        monitor = self._require_monitor()
        monitor.prepare()
        if self.config.freeze is None and not monitor.freezing.freezer.parameters:
            return
        hard = is_hard_freeze_supported(trainer.strategy)
        if not hard:
            monitor.warn_once("soft-freeze", soft_freeze_message(type(trainer.strategy).__name__))
        monitor.restore_freezes(hard=hard)

    @override
    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        """Take the epoch-0 snapshot (unless resuming)."""
        monitor = self._require_monitor()
        monitor.runtime.max_steps = _planned_steps(trainer)  # cross-layer moments, the cost estimate
        monitor.start(step=int(trainer.global_step))
        self._trained = True
        if monitor.measured:  # empty after a resume whose snapshots were dropped (a changed probe or metrics)
            _publish(trainer, [row for row in monitor.history if row["epoch"] == monitor.measured[-1]])

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        """Keep frozen BatchNorm layers in eval mode whatever ``model.train()`` did."""
        if self.monitor is not None:
            self.monitor.before_batch(epoch=int(trainer.current_epoch), batch=batch)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        """Soft freezing only: drop the frozen parameters' gradients."""
        if self.monitor is not None:
            self.monitor.before_optimizer_step()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Report the step's loss to the freeze rule; measure every k steps and on the epoch's last batch."""
        if self.monitor is not None:
            self.monitor.observe_loss(_loss_of(outputs))
        steps = self.config.every_n_train_steps
        step = int(trainer.global_step)
        last = _is_last_batch(trainer, batch_idx)
        if steps is not None and step > 0 and step % steps == 0:
            # on an epoch's last batch the epoch is complete: the row counts it
            self._measure(trainer, completed=self._fit_epoch(trainer) + 1 if last else None)
        elif last:
            self._end_of_epoch(trainer, completed=self._fit_epoch(trainer) + 1)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Measure here when the last batch was not recognisable (iterable data, ``max_steps``).

        An epoch cut short (``max_steps``, ``should_stop``) ends here too: it counts the epochs completed before it
        (as the HuggingFace adapter's ``on_epoch_end`` does), so the measurement after the last completed epoch is
        not repeated under the next epoch's number.
        """
        self._end_of_epoch(trainer, completed=self._fit_epoch(trainer) + _epoch_finished(trainer))

    @override
    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Measure the final weights if needed, and compare every measured epoch with them.

        The values reach ``trainer.callback_metrics`` too: a last measurement's under their tags, and
        ``{metric}/final/{layer}`` the run's first measurement against the final weights (how much of each layer's
        final representation was there at the start; the later ones are in :attr:`history`).
        """
        if self.monitor is not None:
            # the fit loop has counted the last epoch, finished or cut short: only a finished one is completed
            completed = self._fit_epoch(trainer) - (not _epoch_finished(trainer))
            rows = self.monitor.finish(epoch=completed, step=int(trainer.global_step))
            _publish(trainer, _first_against_final(rows))

    @override
    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Close the monitor: its temporary files go (see :meth:`SVCCAMonitor.close`); the run's files stay.

        A finished run resumed (Lightning runs no training hooks then) is finished again first, so its history holds
        the ``final`` rows its CSV has (its checkpoint was written before them).
        """
        if self.monitor is not None and self.monitor.measured and not self._trained:
            self.on_train_start(trainer, pl_module)
            self.on_train_end(trainer, pl_module)
        self._close_monitor()

    @override
    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        """Close the monitor when the fit fails (its temporary files go)."""
        self._close_monitor()

    @override
    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Close the monitor (also after interrupted fits)."""
        if stage == "fit":
            self._close_monitor()

    @override
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: history, freezes, policy counters, snapshots."""
        if self.monitor is not None:
            return {**self.monitor.state_dict(), "epoch_offset": self._epoch_offset}
        return dict(self._pending_state or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (keys missing from older checkpoints take their defaults)."""
        self._epoch_offset = integer_field(state_dict.get("epoch_offset", 0), "epoch_offset")  # checked before use
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Continue the checkpoint's history when this callback's settings changed since it was saved.

        Lightning finds the state under :attr:`state_key` only; a state saved with other layers, references,
        metrics or probe is found by the callback's class here (see :mod:`~lightning_svcca.integrations.resume`).
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or type(self) in states:
            return
        found = orphaned_state(self, trainer.callbacks, states)
        if found is None:
            return
        key, state = found
        if trainer.is_global_zero:
            warnings.warn(
                f"{type(self).__name__} resumes the history saved with other settings"
                f" ({describe_changes(key, self.state_key)}): its rows, freezes and snapshots continue, and what"
                " cannot be compared is said below. Lightning's 'callbacks used to create the checkpoint' warning"
                " is about this state",
                SVCCAMonitorWarning,
                stacklevel=2,
            )
        self.load_state_dict(copy.deepcopy(dict(state)))

    # ------------------------------------------------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------------------------------------------------

    def _end_of_epoch(self, trainer: Any, completed: int) -> None:
        """Measure after ``completed`` epochs of this fit, every ``every_n_epochs``."""
        every_n_epochs = self.config.every_n_epochs
        if every_n_epochs is not None and completed % every_n_epochs == 0:
            self._measure(trainer, completed=completed)

    def _measure(self, trainer: Any, completed: int | None = None) -> None:
        """One measurement at the trainer's global step; its values also go to ``trainer.callback_metrics``."""
        if self.monitor is not None and self.monitor.started:
            epoch = self._fit_epoch(trainer) if completed is None else completed
            skipped = len(self.monitor.skipped)
            rows = self.monitor.measure(epoch=epoch, step=int(trainer.global_step))
            diverged = any(_not_finite(reason) for _, _, reason in self.monitor.skipped[skipped:])
            _publish(trainer, rows, diverged=diverged)

    def _fit_epoch(self, trainer: Any) -> int:
        """Completed epochs of this fit (the trainer's, less those done before the fit began)."""
        return int(trainer.current_epoch) - self._epoch_offset

    def _require_monitor(self) -> SVCCAMonitor:
        if self.monitor is None:
            raise RuntimeError("SVCCACallback runs in Trainer.fit: its setup hook builds the monitor")
        return self.monitor

    def _close_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def _pending(self, key: str, default: Any) -> Any:
        return (self._pending_state or {}).get(key, default)

    def _logger(self) -> logging.Logger:
        """A logger under the Lightning namespace this callback belongs to, so its console handler shows it."""
        for base in type(self).__mro__:
            if base.__name__ == "Callback" and base.__module__ != __name__:
                return logging.getLogger(base.__module__.rsplit(".", 1)[0] + ".svcca")
        return logging.getLogger("lightning_svcca")


def _publish(trainer: Any, rows: Sequence[Mapping[str, Any]], *, diverged: bool = False) -> None:
    """A measurement's values in ``trainer.callback_metrics``, for ``EarlyStopping`` and ``ModelCheckpoint``.

    Each row under its tag, and per metric and reference ``{metric}/{reference}/min_over_layers``: the least
    converged layer (every process computes the same values, so every rank agrees). ``diverged``: a layer was
    skipped for NaN or Inf activations, and the minimum is NaN: over the layers left it read about 1 on a model whose
    loss had blown up, and ``EarlyStopping`` stopped it as converged and ``ModelCheckpoint`` kept it as the best
    (both take a NaN as no improvement; ``EarlyStopping(check_finite=True)``, the default, stops on it).
    """
    lowest: dict[str, float] = {}
    for row in rows:
        name = tag(row["metric"], row["reference"], row["layer"])
        trainer.callback_metrics[name] = torch.tensor(row["value"])
        if row["reference"] not in LAYER_FACTS:
            key = tag(row["metric"], row["reference"], "min_over_layers")
            lowest[key] = math.nan if diverged else min(lowest.get(key, math.inf), row["value"])
    for name, value in lowest.items():
        trainer.callback_metrics[name] = torch.tensor(value)


def _not_finite(reason: str) -> bool:
    """Whether a layer was skipped because its activations hold NaN or Inf (or overflow): the model diverged."""
    return "NaN or Inf" in reason or "overflows" in reason


def _first_against_final(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``rows`` with the ``final`` ones cut to each layer's and metric's earliest measurement."""
    earliest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        key = (row["metric"], row["layer"])
        if row["reference"] == "final" and (key not in earliest or row["step"] < earliest[key]["step"]):
            earliest[key] = row
    return [row for row in rows if row["reference"] != "final"] + list(earliest.values())


def _loss_of(outputs: Any) -> Any:
    """The loss a ``training_step`` returned: a tensor, or a dict's ``"loss"`` (``None`` when there is none)."""
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    return outputs if isinstance(outputs, torch.Tensor) else None


def _planned_steps(trainer: Any) -> int | None:
    """The fit's length in optimizer steps, when Lightning can tell."""
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # e.g. an iterable dataset without a length
        return None
    return int(steps) if math.isfinite(steps) else None


def _runtime(trainer: Any, logger: logging.Logger, *, autocast: bool) -> Runtime:
    """The monitor's view of the trainer: collectives over the strategy, rank zero, precision, DDP rebuilds.

    Precision: the probe's inputs get what the trainer does to training batches (``convert_input``: a cast to the
    model's dtype under ``*-true`` precision). The precision's forward context wraps the probe under ``*-true``
    (it only sets the default dtype); under ``*-mixed`` it is autocast, used only with ``probe_autocast=True``.
    """
    strategy = trainer.strategy
    world_size = int(getattr(strategy, "world_size", 1))
    plugin = getattr(trainer, "precision_plugin", None)
    mixed = "mixed" in str(getattr(trainer, "precision", ""))
    return Runtime(
        collective=StrategyCollective(strategy) if world_size > 1 else LocalCollective(),
        is_global_zero=bool(trainer.is_global_zero),
        broadcast=lambda obj: strategy.broadcast(obj, src=0),
        # FSDP2 (ModelParallelStrategy): resharded after each probe pass, so a freeze lands on the shards
        forward_context=resharding(
            trainer.lightning_module, getattr(plugin, "forward_context", None) if autocast or not mixed else None
        ),
        convert_input=getattr(plugin, "convert_input", None),
        after_freeze=lambda: None if rebuild_ddp_wrapper(strategy) else None,  # rebuilt or not, nothing to do
        max_epochs=trainer.max_epochs,
        logger=logger,
        probe_as_training=autocast or not mixed,
    )


def _with_probe(config: MonitorConfig, probe: Any) -> MonitorConfig:
    """The config with its probe replaced (``None`` becomes a loader taken from the trainer at probe time)."""
    return config if config.probe is not None else dataclasses.replace(config, probe=probe)


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


def _epoch_finished(trainer: Any) -> bool:
    """Whether the running (or last) epoch ran all its batches, as Lightning's epoch loop decides it.

    False for an epoch cut short by ``max_steps`` or ``should_stop``; read in ``on_train_epoch_end`` and
    ``on_train_end``, before the next epoch resets the batch progress.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return _is_last_batch(trainer, progress.current.ready - 1)


def _describe_probe(probe: Any, size: int) -> str:
    """A stable, cheap description of the probe argument (its kind and tensor shapes, not its contents)."""
    if probe is None or isinstance(probe, DataLoader):
        return f"{'loader' if probe is not None else 'default'}:{size}"
    if isinstance(probe, Tensor):
        return f"tensor:{tuple(probe.shape)}"
    if isinstance(probe, Mapping):
        return "dict:" + ",".join(f"{k}{tuple(v.shape) if isinstance(v, Tensor) else ''}" for k, v in probe.items())
    return f"{type(probe).__name__}:" + ",".join(str(tuple(v.shape)) for v in probe if isinstance(v, Tensor))


class SVCCACallback(_SVCCACallbackCore, pl.Callback):  # noqa: D101 - the docstring is the core's
    __doc__ = _SVCCACallbackCore.__doc__


def _run_folder(trainer: Any) -> Path:
    """The folder of this run's history CSV and snapshots: the TensorBoard or CSV logger's version folder.

    ``trainer.log_dir`` is that folder for those two; for the others it is the logger's ``save_dir``, which holds
    every run's files (MLflow's tracking store, where a foreign folder breaks ``mlflow.search_experiments``; W&B's
    ``wandb`` root). Then, and without a logger, ``default_root_dir``: runs sharing it get their own CSV names.
    """
    first = trainer.loggers[0] if trainer.loggers else None
    if first is not None and type(first).__name__ in ("TensorBoardLogger", "CSVLogger") and trainer.log_dir:
        return Path(trainer.log_dir)
    return Path(trainer.default_root_dir)
