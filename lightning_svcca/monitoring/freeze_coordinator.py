"""Freeze training within a run: the monitor's freezing steps, from a measurement's rows to frozen parameters.

:class:`FreezingCoordinator` is what the monitor asks about freezing. At each measurement it runs the probe past a
verified frozen prefix (:class:`~lightning_svcca.freezing.frozen_prefix.FrozenPrefix`), then decides which layers
freeze (the :class:`~lightning_svcca.freezing.freezer.FreezePolicy`, on rank zero), broadcasts the decisions,
and applies them on every process at the same step (:class:`~lightning_svcca.freezing.freezer.Freezer`). Between
measurements it keeps the freezes applied (BatchNorm modes, soft freezing's dropped gradients), and it carries the
freeze state across checkpoints.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_svcca.core.rows import FREEZE_METRIC, FREEZE_REFERENCE, row, values_of
from lightning_svcca.freezing.blocks import freeze_blocks, freeze_message, trainable_parameters
from lightning_svcca.freezing.freezer import Freezer
from lightning_svcca.freezing.frozen_prefix import FrozenPrefix
from lightning_svcca.freezing.policy import FreezeDecision
from lightning_svcca.freezing.rules import Evidence
from lightning_svcca.freezing.task_signal import TaskSignal, TaskVerdict
from lightning_svcca.monitoring.config import MonitorConfig
from lightning_svcca.monitoring.runtime import Runtime
from lightning_svcca.pipeline.capture import Capture, WarnFn
from lightning_svcca.pipeline.probe_loss import label_entropy
from lightning_svcca.pipeline.recording import ActivationRecorder
from lightning_svcca.pipeline.snapshot import Snapshot
from lightning_svcca.pipeline.store import SnapshotStore

__all__ = ["FreezingCoordinator"]


#: Why freezing waits for a layer measured without a comparison with the run's first snapshot.
_UNJUDGEABLE = (
    "{layer} cannot be judged: it has no comparison with the run's first snapshot (a layer new in this run, or"
    " snapshots dropped when a resume changed the probe, the metrics or the layers), so the movement rule freezes"
    " neither it nor, bottom-up, the layers above it. Freeze it when you choose"
    " (FreezePolicy(rule=Schedule(epochs={{...}}))), or resume with the settings the run began with"
)


class FreezingCoordinator:
    """The freezes of one run: decided on rank zero, applied everywhere, kept applied, saved with checkpoints.

    Args:
        model: the model being trained.
        config: the monitor's options: the freeze policy (``None``: freezes restored from a checkpoint are still kept
            applied), the lag reference it reads, and whether a lag counts measurements (every k steps) or epochs.
        store: the run's snapshots (the frozen prefix reuses them; the prefix cache spills beside them).
        runtime: rank, broadcast, ``max_epochs``, the after-freeze hook and the logger.
        warn_once: the monitor's once-per-key warning.
        announce: writes a freeze event as text at a step (on rank zero).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MonitorConfig,
        store: SnapshotStore,
        runtime: Runtime,
        warn_once: WarnFn,
        announce: Callable[[str, int], None],
    ) -> None:
        self.model = model
        self.policy = policy = config.freeze
        self.store = store
        self.runtime = runtime
        cache_logger = runtime.logger if runtime.is_global_zero else None  # the prefix cache's engage/serve/off lines
        self.freezer = Freezer(policy=policy, spill_dir=self._cache_dir, logger=cache_logger)
        #: Frozen layers -> the epoch at which they froze.
        self.frozen: dict[str, int] = {}
        #: The policy's per-layer counts of consecutive converged measurements.
        self.streaks: dict[str, int] = {}
        #: The training loss the loop reports (:meth:`observe_loss`), which the policy's task gate reads.
        self.task = TaskSignal()
        #: The kinds of waiting line said since the fit's start or the last freeze (each is said once).
        self._said_waiting: set[str] = set()
        #: The probe pass past the frozen prefix (built by :meth:`attach`, once the probe exists).
        self.prefix: FrozenPrefix | None = None
        self.lag_reference = config.lag_reference
        self.lag_in_measurements = config.every_n_train_steps is not None
        self._warn_once = warn_once
        self._announce = announce
        self._warn_if_too_short(config.every_n_epochs)

    def attach(self, capture: Capture) -> None:
        """Take the run's probe passes: from now on :meth:`probe_pass` may reuse the frozen prefix.

        The probe's labels also set the level its loss must fall below to count as progress (their entropy).
        """
        self.task.prior = label_entropy(capture.probe)
        self._said_waiting.clear()
        self.prefix = FrozenPrefix(
            capture,
            self.store,
            self.freezer,
            self.runtime.collective,
            self._warn_once,
            serve_probe=self.runtime.probe_as_training,
        )

    def _warn_if_too_short(self, every: int | None) -> None:
        """Say so when the rule measures too few times in this fit for a freeze to pay (``every``: per epochs).

        The movement rule judges a layer from the second measurement after the first snapshot on (at the first, the
        lagged snapshot is the first one), so its earliest freeze comes ``2 * every`` epochs into the fit.
        """
        if self.policy is None or self.lag_in_measurements or not every:
            return
        warning = self.policy.rule.short_fit_warning(self.runtime.max_epochs, every)
        if warning is not None:
            self._warn_once("freeze-short-run", warning)

    # ------------------------------------------------------------------------------------------------------------
    # At each measurement
    # ------------------------------------------------------------------------------------------------------------

    def probe_pass(
        self, layers: Sequence[str], last_point: int | None, device: torch.device
    ) -> tuple[ActivationRecorder, dict[str, Snapshot]]:
        """The probe's activations of the layers not known since ``last_point``, and the known layers' snapshots.

        A layer is known when it belongs to the verified frozen prefix and has a snapshot at ``last_point`` on
        every process: its snapshot there (the same object) still holds. ``last_point=None``: no reuse (nothing
        measured yet, or every layer is needed in full).
        """
        assert self.prefix is not None, "attach() the capture first"
        known = self.prefix.known_layers(layers, last_point, device) if self.freezer.caching else []
        recorder = self.prefix.record(self.model, device, known)
        return recorder, self.prefix.reused(known, last_point) if known and last_point is not None else {}

    def observe_loss(self, loss: Any) -> None:
        """One training batch's loss, for the policy's task gate (a tensor is read only at the next measurement)."""
        if self.policy is not None and self.policy.task is not None:
            self.task.observe(loss)

    def freeze_converged(
        self,
        rows: Sequence[Mapping[str, Any]],
        epoch: int,
        step: int,
        layers: Sequence[str],
        measurement: int | None = None,
        *,
        probe_loss: float | None = None,
        span: tuple[int, int] | None = None,
        lag: int | None = None,
        point: int | None = None,
    ) -> None:
        """Decide on rank zero from this measurement's ``rows``, broadcast, and freeze on every process alike.

        ``measurement``: measurements since the first (what the ``Movement`` rule's lag grows with; default
        ``epoch``). ``probe_loss``: the probe's own loss at this measurement, for the task gate. ``span``: the
        epochs (or steps) since the first snapshot and since the rule's lagged one (its pace is read over them);
        ``lag``: how many measurements back the lagged one lies.
        ``point``: this measurement's epoch (or step), where the task's losses are placed (default ``epoch``).
        """
        assert self.policy is not None and self.prefix is not None
        self.task.close_interval(probe_loss, epoch if point is None else point)
        decisions: list[FreezeDecision] = []
        if self.runtime.is_global_zero:
            decisions = self._decide(rows, epoch, layers, measurement, span, lag)
        decisions, self.streaks = self.runtime.broadcast((decisions, self.streaks))
        if decisions and self._fit_ends_at(epoch, step):
            self._hold_at_the_end(decisions, epoch)
        elif decisions:
            self._apply(decisions, epoch, step, layers)

    def _fit_ends_at(self, epoch: int, step: int) -> bool:
        """Whether no training follows this measurement: the fit's last epoch (or step, when known) is done."""
        max_epochs, max_steps = self.runtime.max_epochs, self.runtime.max_steps
        return bool(max_epochs and max_epochs > 0 and epoch >= max_epochs) or bool(max_steps and step >= max_steps)

    def _hold_at_the_end(self, decisions: Sequence[FreezeDecision], epoch: int) -> None:
        """One line instead of freezing after the last epoch, where a freeze saves nothing.

        The streaks are kept (in the checkpoint too): a fit resumed for more epochs judges these layers again at its
        first measurement, with their streaks as they are now.
        """
        if self.runtime.is_global_zero:
            layers = ", ".join(repr(decision.layer) for decision in decisions)
            self.runtime.logger.info(
                f"freezing: {layers} would freeze at epoch {epoch}, but the fit ends there and a freeze saves"
                " nothing (not frozen; a fit resumed for more epochs judges them again at its first measurement)"
            )

    def frozen_rows(self, epoch: int, step: int, layers: Sequence[str]) -> list[dict[str, Any]]:
        """A ``frozen`` row (1 or 0) per layer, with a policy or freezes; ``[]`` without either."""
        if self.policy is None and not self.frozen:
            return []
        return [
            row(epoch, step, layer, FREEZE_REFERENCE, FREEZE_METRIC, float(layer in self.frozen)) for layer in layers
        ]

    def _decide(
        self,
        rows: Sequence[Mapping[str, Any]],
        epoch: int,
        layers: Sequence[str],
        measurement: int | None,
        span: tuple[int, int] | None = None,
        lag: int | None = None,
    ) -> list[FreezeDecision]:
        """The policy's decisions from the lag reference's, the initial and the baseline's values (keeps streaks)."""
        policy = self.policy
        assert policy is not None and self.prefix is not None
        blocks = freeze_blocks(self.prefix.completion, layers, self.model)
        idle = [layer for layer, block in blocks.items() if not trainable_parameters(self.model, block)]
        task = self._task_verdict()
        evidence = Evidence(
            epoch=epoch,
            layers=layers,
            frozen=self.frozen,
            similarities=values_of(rows, self.lag_reference, policy.metric),
            initial=values_of(rows, "initial", policy.metric),
            baselines=values_of(rows, "baseline", policy.metric),
            measurement=measurement,
            span=span,
            lag=lag,
            max_epochs=self.runtime.max_epochs,
            lag_in_measurements=self.lag_in_measurements,
            idle=idle,
            task=task,
            metric=policy.metric,
        )
        outcome = policy.decide(evidence, self.streaks)
        self.streaks = outcome.streaks
        lagged = policy.rule.lagged  # None: a schedule freezes when planned, it never waits for anything
        if lagged is not None and (epoch if measurement is None else measurement) > 0:  # the first: nothing to judge
            # a rule that reads each layer against its first snapshot cannot judge a measured layer without it
            measured = evidence.similarities if lagged.initial else {}
            unjudgeable = [layer for layer in measured if layer not in evidence.initial]
            candidates = layers[: policy.kept_from(layers, idle)]
            self._say_why_waiting(outcome.decisions, candidates, task, outcome.notes, unjudgeable)
        return outcome.decisions

    def _task_verdict(self) -> TaskVerdict | None:
        """The policy's task gate on the loss seen so far (``None`` without a gate or for a rule that reads none)."""
        policy = self.policy
        if policy is None or policy.task is None or not policy.rule.reads_task:
            return None
        if not self.task.seen and len(self.task.probe) > 1:  # measured after training steps, and no loss came
            self._warn_once(
                "freeze-no-loss",
                "FreezePolicy's task gate has seen no training loss, so the representations decide alone and a"
                " network stuck on a loss plateau can read as converged. The Lightning and HuggingFace callbacks"
                " pass the loss themselves; a plain loop passes it with monitor.observe_loss(loss) after each"
                " step (or measure(..., loss=...)). FreezePolicy(task=None) silences this",
            )
        return policy.task.verdict(self.task, policy.rule.loss_window)

    def _say_why_waiting(
        self,
        decisions: Sequence[FreezeDecision],
        candidates: Sequence[str],
        task: TaskVerdict | None,
        notes: Mapping[str, str],
        unjudgeable: Sequence[str] = (),
    ) -> None:
        """A line when freezing waits, once for each reason (no task progress yet, still moving) until a freeze.

        ``candidates``: the layers the policy may freeze. A gate that opens and closes by turns says each reason
        once, not at every turn.
        """
        if decisions:
            self._said_waiting.clear()
            return
        waiting = [layer for layer in candidates if layer not in self.frozen]
        if not waiting:
            return
        if task is not None and not task.allows:
            kind, why = "task", task.reason
        elif waiting[0] in unjudgeable:
            kind, why = "unjudgeable", _UNJUDGEABLE.format(layer=repr(waiting[0]))
        else:
            lowest = waiting[0]
            kind = "moving"
            why = f"{lowest!r} is still moving: {notes[lowest]}" if lowest in notes else f"{lowest!r} not judged yet"
        if kind not in self._said_waiting:
            self._said_waiting.add(kind)
            self.runtime.logger.info(f"freezing waits: {why}")

    def _apply(self, decisions: Sequence[FreezeDecision], epoch: int, step: int, layers: Sequence[str]) -> None:
        """Freeze each decided layer's block, never the last trainable parameters; then the after-freeze hook."""
        assert self.prefix is not None
        blocks = freeze_blocks(self.prefix.completion, layers, self.model)
        idle = []
        for decision in decisions:
            block = blocks[decision.layer]
            if not self.freezer.leaves_trainable(self.model, block):
                self._warn_once(
                    "freeze-all",
                    f"the freeze policy would freeze every trainable parameter at layer {decision.layer!r}; it stops"
                    " one short and that layer keeps training. FreezePolicy(keep_last=...) keeps the top monitored"
                    f" layers that have something to train training (now {self.policy.keep_last}): the trainable"
                    " parameters left are in the layers it would freeze or outside the monitored layers",
                )
                break
            message = freeze_message(self.model, decision.layer, block, epoch, decision.reason)
            if message is None:  # nothing trainable of its own: it counts for the order, but is no freeze
                idle.append(decision.layer)
            elif self.runtime.is_global_zero:  # said before the freeze: the cache's line about it comes after
                self.runtime.logger.info(message)
                self._announce(message, step)
            self.freezer.freeze(self.model, decision.layer, block)
            self.frozen[decision.layer] = epoch
        if idle and self.runtime.is_global_zero:
            subject = "it has" if len(idle) == 1 else "they have"
            owner = "its" if len(idle) == 1 else "their"
            self.runtime.logger.info(
                f"freezing counts {', '.join(map(repr, idle))} as frozen from epoch {epoch}: {subject} no trainable"
                f" parameters of {owner} own (none at all, frozen before this fit, or a PEFT model's base that trains"
                " adapters elsewhere)"
            )
        if self.freezer.hard and self.runtime.after_freeze is not None:
            self.runtime.after_freeze()

    # ------------------------------------------------------------------------------------------------------------
    # Between measurements, for the training loop
    # ------------------------------------------------------------------------------------------------------------

    def restore(self, *, hard: bool) -> None:
        """Apply freezes restored from a checkpoint (before any training step); ``hard=False``: gradients dropped."""
        self.freezer.hard = hard
        if self.freezer.parameters:
            self.freezer.apply(self.model, norms=False)
            if hard and self.runtime.after_freeze is not None:
                self.runtime.after_freeze()

    def before_batch(self, epoch: int | None, batch: Any = None) -> None:
        """Frozen BatchNorm layers back in eval mode; the prefix cache told the loop's epoch (and given the batch)."""
        self.freezer.start_batch(self.model, -1 if epoch is None else int(epoch), batch)

    def cache_scalars(self, epoch: int, step: int) -> list[dict[str, Any]]:
        """The prefix cache's ``svcca/cache/*`` scalars (served share, bytes held), logged but not kept in history."""
        return [row(epoch, step, name, "cache", "svcca", value) for name, value in self.freezer.cache_stats().items()]

    def before_optimizer_step(self) -> None:
        """Soft freezing only: drop the frozen parameters' gradients."""
        if not self.freezer.hard and self.freezer.parameters:
            self.freezer.drop_gradients(self.model)

    def close(self) -> None:
        """Take the prefix cache off the model and delete its files."""
        self.freezer.close()

    def _cache_dir(self) -> Path:
        """A fresh folder for the frozen-prefix cache's spill files: in the run's folder, else a temporary one.

        Not in a run folder where a write already failed (read-only, full): the temporary folder instead.
        """
        if self.store.writable_directory is not None:
            return self.store.writable_directory / f"prefix_cache_{uuid.uuid4().hex[:8]}"
        return Path(tempfile.mkdtemp(prefix="svcca_prefix_cache_"))

    # ------------------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries ``frozen``, ``streaks``, ``freezer`` and ``task``."""
        return {
            "frozen": dict(self.frozen),
            "streaks": dict(self.streaks),
            "freezer": self.freezer.state_dict(),
            "task": self.task.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entries (missing ones: nothing frozen)."""
        self.frozen = dict(state.get("frozen", {}))
        self.streaks = dict(state.get("streaks", {}))
        self.freezer.load_state_dict(state.get("freezer", {}))
        self.task.load_state_dict(state.get("task", {}))
