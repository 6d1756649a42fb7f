"""Freeze rules: when a layer is ready to freeze, one small dataclass each, with only its own parameters.

A rule reads one measurement's :class:`Evidence` and says which layers are ready and why (:class:`Readiness`,
with a note for each judged layer that is not, for the waiting line). :class:`Movement` (the default) judges a
layer's recent movement against its movement since the start; :class:`Convergence` its similarity to a snapshot a
fixed lag earlier; :class:`LinearSchedule` and :class:`Schedule` freeze at planned epochs. The
:class:`~lightning_svcca.freezing.policy.FreezePolicy` holds a rule beside what every rule shares (the task gate,
patience, the order and bounds), and applies the order and the bounds to what the rule finds ready.

A rule keeps no state: the streaks of consecutive converged measurements come in and go out
(:attr:`Readiness.streaks`), so the caller holds them (and checkpoints them).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from lightning_svcca.core.timeline import fraction_lag
from lightning_svcca.freezing.task_signal import TaskVerdict
from lightning_svcca.pipeline.wrappers import shown_name

__all__ = [
    "MIN_MOVEMENT",
    "Convergence",
    "Evidence",
    "FreezeRule",
    "LaggedSnapshot",
    "LinearSchedule",
    "Movement",
    "Readiness",
    "Schedule",
    "relative_movement",
]

#: Below this total movement ``1 - s(t, 0)`` a layer is not judged yet: an unchanged layer measures about 5e-8 (the
#: rounding of float32 activations in its snapshots), so a ratio of such values is noise. A LoRA adapter starts
#: at zero and moves by 1e-6 in its first epochs; fully or LoRA fine-tuned layers reach 1e-2 within a few epochs.
MIN_MOVEMENT = 1e-5
#: The window the task gate reads the loss with under a rule that has none of its own (a fraction of the run).
DEFAULT_LOSS_WINDOW = 0.5


def relative_movement(
    recent: float, total: float, measurement: int, fraction: float, span: tuple[float, float] | None = None
) -> float:
    """``rho = (1 - s(t, t - lag)) / (1 - s(t, 0)) * (t / lag)**2``: a layer's recent pace against its pace so far.

    ``1 - SVCCA`` grows as the square of a small displacement, so a layer moving at a steady speed has
    ``(1 - s(t, t - lag)) / (1 - s(t, 0)) = (lag / t)**2`` and ``rho = 1``; a layer that has stopped has ``rho``
    near 0. Both similarities are of the same layer on the same probe, so ``rho`` has no units: a LoRA-adapted
    layer that moves 1% in total reads like a fully trained one. (A layer that has not moved at all gives 0.)

    Args:
        recent: ``s(t, t - lag)``, the similarity to the snapshot ``lag = fraction_lag(t, fraction)`` back.
        total: ``s(t, 0)``, the similarity to the first snapshot.
        measurement: ``t``, measurements since the first (epochs, when measuring every epoch).
        fraction: the lag as a fraction of ``t``.
        span: the time since the first snapshot and since the lagged one, in epochs or steps
            (:meth:`~lightning_svcca.core.timeline.Timeline.span_by_fraction`): their ratio replaces ``t / lag``,
            which it equals when measurements are evenly spaced. ``None``: evenly spaced.
    """
    if total >= 1.0:
        return 0.0
    ratio = span[0] / span[1] if span is not None and span[1] > 0 else measurement / fraction_lag(measurement, fraction)
    return max(0.0, 1.0 - recent) / (1.0 - total) * ratio**2


def _span_words(evidence: Evidence) -> str:
    """`` (4 of 24 steps)``: the recent window and the time since the first snapshot, when they are known."""
    if evidence.span is None:
        return ""
    unit = "steps" if evidence.lag_in_measurements else "epochs"
    return f" ({evidence.span[1]:g} of {evidence.span[0]:g} {unit})"


@dataclass(frozen=True)
class Evidence:
    """One measurement, as a freeze rule reads it.

    Attributes:
        epoch: completed epochs.
        layers: the monitored layers in forward (bottom-up) order.
        frozen: the layers frozen already -> the epoch they froze at (a rule does not judge them).
        similarities: each layer's similarity to the snapshot the rule compares with (:attr:`FreezeRule.lagged`).
        initial: each layer's similarity to its first snapshot (:class:`Movement`).
        baselines: each layer's shuffled-pairing baseline (:class:`Convergence` with ``noise_aware``).
        measurement: measurements since the first (``None``: ``epoch``), what :class:`Movement`'s lag grows with.
        span: the time (epochs, or steps) since the first snapshot and since the lagged one, which
            :class:`Movement` reads its pace over (``None``: measurements evenly spaced, ``t / lag``).
        lag: how many measurements back the lagged snapshot lies (``None``: :func:`fraction_lag` of ``t``, as
            when measurements are evenly spaced).
        max_epochs: the fit's ``max_epochs`` (:class:`LinearSchedule`).
        lag_in_measurements: lags count measurements (measuring every k steps), not epochs: how a reason names
            the snapshot compared with.
        idle: layers with nothing trainable of their own (:class:`Movement` counts them as converged; the policy's
            ``keep_last`` keeps the top layers that are not).
        task: what the training loss says (:meth:`~lightning_svcca.freezing.task_signal.TaskGate.verdict`), for
            the rules that read it (:attr:`FreezeRule.reads_task`); ``None``: no gate.
        metric: the measure the similarities are in, as the reasons name it.
    """

    epoch: int
    layers: Sequence[str]
    frozen: Mapping[str, int] = field(default_factory=dict)
    similarities: Mapping[str, float] = field(default_factory=dict)
    initial: Mapping[str, float] = field(default_factory=dict)
    baselines: Mapping[str, float] = field(default_factory=dict)
    measurement: int | None = None
    span: tuple[float, float] | None = None
    lag: int | None = None
    max_epochs: int | None = None
    lag_in_measurements: bool = False
    idle: Collection[str] = ()
    task: TaskVerdict | None = None
    metric: str = "svcca"

    def unfrozen(self) -> list[str]:
        """The layers not frozen yet, bottom-up."""
        return [layer for layer in self.layers if layer not in self.frozen]


@dataclass(frozen=True)
class Readiness:
    """What a rule found: the layers ready to freeze and why, a note for each judged layer that is not, the streaks.

    Attributes:
        ready: layer -> the reason it may freeze (before the policy's order and bounds).
        notes: layer -> its numbers, for a layer judged but not ready (the waiting line names the lowest).
        streaks: consecutive converged measurements per layer after this measurement (the caller keeps them).
    """

    ready: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    streaks: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LaggedSnapshot:
    """The earlier snapshot a rule compares each layer with, for the monitor to keep and measure against.

    Attributes:
        lag: a fixed lag (epochs per epoch, measurements every k steps); ``0`` with ``fraction``.
        fraction: a lag that grows with the run, this fraction of the measurements so far (``0.0``: fixed).
        initial: the rule also reads each layer's similarity to its first snapshot.
    """

    lag: int = 0
    fraction: float = 0.0
    initial: bool = False


class FreezeRule:
    """The base of the freeze rules: what a rule tells the policy and the monitor besides :meth:`readiness`."""

    #: The rule judges measured similarities: the policy's ``metric`` must be measured, the task gate applies.
    reads_task: ClassVar[bool] = True

    def readiness(self, evidence: Evidence, streaks: Mapping[str, int], patience: int = 1) -> Readiness:
        """The layers ready from ``evidence``, given the streaks so far; ``patience``: converged measurements needed."""
        raise NotImplementedError

    @property
    def lagged(self) -> LaggedSnapshot | None:
        """The snapshot each layer is compared with (``None``: the rule measures nothing)."""
        return None

    @property
    def loss_window(self) -> float:
        """The recent window the task gate reads the loss over, as a fraction of the run."""
        return DEFAULT_LOSS_WINDOW

    @property
    def needs_baseline(self) -> bool:
        """Whether the rule reads the shuffled-pairing baseline."""
        return False

    def freeze_epochs(self, layers: Sequence[str], max_epochs: int | None) -> dict[str, int]:
        """Planned freeze epoch of each layer (``{}``: the rule plans none)."""
        return {}

    def check_layers(self, layers: Sequence[str]) -> None:
        """Raise ``ValueError`` when the rule names a layer not among the monitored ``layers``."""

    def check_fit(self, max_epochs: int | None) -> None:
        """Raise ``ValueError`` when the rule cannot work in a fit of ``max_epochs`` (``None``: unbounded)."""

    def short_fit_warning(self, max_epochs: int | None, every: int) -> str | None:
        """A warning when a fit of ``max_epochs`` measured every ``every`` epochs is too short for the rule to pay."""
        return None


@dataclass(frozen=True)
class Movement(FreezeRule):
    """The default rule: a layer is ready once its recent movement is small against its movement since the start.

    Its relative movement :func:`relative_movement` (its movement over the last ``lag_fraction`` of the
    measurements, against its movement since the first, normalised so that a steady pace reads 1) has to stay below
    ``threshold`` for ``patience`` consecutive measurements. Scale-free: the same constants from scratch,
    fine-tuning and LoRA (see ``docs/freezing.md``). A layer with nothing trainable of its own (the embeddings
    under LoRA) counts as converged; one that has moved less than :data:`MIN_MOVEMENT` since the start is not
    judged yet (its ratio would be measurement noise), nor is a measurement whose lagged snapshot is the first (its
    relative movement is 1 by definition). The shuffled baseline needs no correction here: the factor
    ``1 / (1 - baseline)`` cancels in the ratio.

    Args:
        threshold: relative movement below which a measurement counts as converged (1 is a steady pace; 0.75:
            the layer moves at about 87% of its average speed so far, or less).
        lag_fraction: the recent window, as a fraction ``f`` of the measurements so far: at measurement ``t`` a
            layer is compared with its snapshot ``max(1, floor(f * t + 1/2))`` measurements back (and with its
            first). The monitor keeps the snapshots this reaches; the task gate reads the loss over the same window.
    """

    threshold: float = 0.75
    lag_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.threshold <= 0.0:
            raise ValueError(f"Movement.threshold must be > 0, got {self.threshold}")
        if not 0.0 < self.lag_fraction <= 1.0:
            raise ValueError(f"Movement.lag_fraction must be in (0, 1], got {self.lag_fraction}")

    @property
    def lagged(self) -> LaggedSnapshot:
        """A lag of ``lag_fraction`` of the run, and the first snapshot: the two sides of the relative movement."""
        return LaggedSnapshot(fraction=self.lag_fraction, initial=True)

    @property
    def loss_window(self) -> float:
        """The task gate reads the loss over the rule's own window."""
        return self.lag_fraction

    def readiness(self, evidence: Evidence, streaks: Mapping[str, int], patience: int = 1) -> Readiness:
        """Layers whose relative movement stayed below ``threshold`` for ``patience`` measurements, with the reason."""
        t = evidence.epoch if evidence.measurement is None else evidence.measurement
        recent, initial, idle = evidence.similarities, evidence.initial, set(evidence.idle)
        lag = fraction_lag(t, self.lag_fraction) if evidence.lag is None else evidence.lag
        result = Readiness(streaks=dict(streaks))
        counts = result.streaks
        for layer in evidence.unfrozen():
            if layer in idle:
                counts[layer] = counts.get(layer, 0) + 1
                reason = "nothing of its own trains"
            elif t > lag and layer in recent and layer in initial and 1.0 - initial[layer] >= MIN_MOVEMENT:
                rho = relative_movement(recent[layer], initial[layer], t, self.lag_fraction, evidence.span)
                converged = rho < self.threshold
                counts[layer] = counts.get(layer, 0) + 1 if converged else 0
                streak = f" for {counts[layer]} measurement(s)" if converged else ""
                reason = (
                    f"relative movement {rho:.3f} {'<' if converged else '>='} {self.threshold}{streak}"
                    f" (1 - {evidence.metric}: {1.0 - recent[layer]:.2e} over the last {lag} measurement(s)"
                    f"{_span_words(evidence)}, {1.0 - initial[layer]:.2e} since the start)"
                )
            else:  # not measured, too little movement yet to tell a pace from noise, or t <= lag: the lagged
                # snapshot is the first, so rho = 1 by definition and says nothing (a threshold above 1 would
                # otherwise freeze every layer at the first measurement)
                counts[layer] = 0
                continue
            (result.ready if counts[layer] >= patience else result.notes)[layer] = reason
        return result

    def short_fit_warning(self, max_epochs: int | None, every: int) -> str | None:
        """The rule judges a layer from its second measurement on: a fit of three measurements or fewer gains little."""
        if not max_epochs or max_epochs < 0:
            return None
        measurements = math.ceil(max_epochs / every)  # the end of the fit is measured too
        if measurements > 3:
            return None
        left = max_epochs - 2 * every
        can = "nothing before the end" if left <= 0 else f"for the last {left} of its {max_epochs} epochs at most"
        return (
            f"the Movement freeze rule gets {measurements} measurement(s) after training in this fit"
            f" (max_epochs={max_epochs}, every_n_epochs={every}; the one before training is its reference) and judges"
            f" a layer from its second measurement on, so it can freeze {can}."
            " Measure by steps (every_n_train_steps=...) to give it more points, or freeze at epochs you choose"
            " (FreezePolicy(rule=Schedule(epochs={...})))"
        )


@dataclass(frozen=True)
class Convergence(FreezeRule):
    """A layer is ready once its similarity to its own snapshot ``lag`` earlier stays at or above ``threshold``.

    Training from scratch, comparing consecutive epochs declares convergence far too early: weights move slowly at
    a small learning rate even while far from their final values. Fine-tuning a pretrained model for a few epochs,
    consecutive epochs with ``patience=2`` do (:meth:`FreezePolicy.for_fine_tuning
    <lightning_svcca.freezing.policy.FreezePolicy.for_fine_tuning>`).

    Args:
        threshold: similarity at or above which a measurement counts as converged.
        lag: epochs between the two snapshots compared (a multiple of the monitor's ``every_n_epochs``; measuring
            every k steps, it counts measurements).
        noise_aware: judge ``(value - baseline) / (1 - baseline)``, with ``baseline`` the same measure on the probe
            with its datapoint pairing shuffled, so CCA's small-probe bias (high values for unrelated data when
            directions are many and datapoints few) cannot pass for convergence. Needs the monitor's baseline.
    """

    threshold: float = 0.99
    lag: int = 5
    noise_aware: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"Convergence.threshold must be in (0, 1], got {self.threshold}")
        if self.lag < 1:
            raise ValueError(f"Convergence.lag must be >= 1, got {self.lag}")

    @property
    def lagged(self) -> LaggedSnapshot:
        """The snapshot ``lag`` earlier."""
        return LaggedSnapshot(lag=self.lag)

    @property
    def needs_baseline(self) -> bool:
        """``noise_aware`` reads the baseline."""
        return self.noise_aware

    def readiness(self, evidence: Evidence, streaks: Mapping[str, int], patience: int = 1) -> Readiness:
        """Layers whose similarity stayed at or above ``threshold`` for ``patience`` measurements, with the reason.

        A layer without a similarity at this measurement keeps its streak.
        """
        if evidence.lag_in_measurements:
            earlier = f"the snapshot {self.lag} measurement(s) earlier"
        else:
            earlier = f"epoch {evidence.epoch - self.lag}"
        baselines = evidence.baselines
        result = Readiness(streaks=dict(streaks))
        counts = result.streaks
        for layer in evidence.unfrozen():
            if layer not in evidence.similarities:
                continue
            value = evidence.similarities[layer]
            judged, note = value, f"{evidence.metric} to {earlier} = {value:.4f}"
            if self.noise_aware and layer in baselines and baselines[layer] < 1.0:
                judged = (value - baselines[layer]) / (1.0 - baselines[layer])
                note += f", {judged:.4f} above the shuffled baseline {baselines[layer]:.4f}"
            converged = judged >= self.threshold
            counts[layer] = counts.get(layer, 0) + 1 if converged else 0
            if converged:
                reason = f"{note} >= {self.threshold} for {counts[layer]} measurement(s)"
            else:
                reason = f"{note} < {self.threshold}"
            (result.ready if converged and counts[layer] >= patience else result.notes)[layer] = reason
        return result


class _Planned(FreezeRule):
    """A rule that freezes each layer at a planned epoch, whatever the measurements say."""

    reads_task: ClassVar[bool] = False
    #: Appended to a reason: which plan it was.
    _by: ClassVar[str] = ""

    def readiness(self, evidence: Evidence, streaks: Mapping[str, int], patience: int = 1) -> Readiness:
        """The layers whose planned epoch has come (``streaks`` pass through unchanged)."""
        planned = self.freeze_epochs(evidence.layers, evidence.max_epochs)
        ready = {
            layer: f"scheduled for epoch {planned[layer]}{self._by}"
            for layer in evidence.unfrozen()
            if layer in planned and evidence.epoch >= planned[layer]
        }
        return Readiness(ready=ready, streaks=dict(streaks))


@dataclass(frozen=True)
class LinearSchedule(_Planned):
    """The SVCCA paper's schedule: layer ``i`` of ``L`` (bottom-up, from 1) at epoch ``ceil(i / L * max_epochs)``.

    Needs the fit's ``max_epochs``.
    """

    _by: ClassVar[str] = " by the linear schedule"

    def freeze_epochs(self, layers: Sequence[str], max_epochs: int | None) -> dict[str, int]:
        """Layer ``i`` of ``L`` at ``ceil(i / L * max_epochs)``."""
        if not max_epochs or max_epochs < 0:
            raise ValueError("the LinearSchedule freeze rule needs the Trainer's max_epochs to place its schedule")
        count = len(layers)
        return {layer: math.ceil((i + 1) / count * max_epochs) for i, layer in enumerate(layers)}

    def check_fit(self, max_epochs: int | None) -> None:
        """The schedule spreads freezes over ``max_epochs``: it has to be set."""
        if max_epochs is None or max_epochs < 1:
            raise ValueError("the LinearSchedule rule spreads freezes over max_epochs: set Trainer(max_epochs=...)")


@dataclass(frozen=True)
class Schedule(_Planned):
    """Each named layer freezes once ``epochs[layer]`` epochs are done.

    Args:
        epochs: ``{layer: epoch}``. Names may hold ``torch.compile``'s ``_orig_mod`` segments, which the monitored
            names leave out.
    """

    epochs: dict[str, int]

    def __post_init__(self) -> None:
        if not self.epochs:
            raise ValueError("Schedule needs epochs={layer: epoch, ...}")

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.epochs.items())))

    def freeze_epochs(self, layers: Sequence[str], max_epochs: int | None) -> dict[str, int]:
        """The scheduled epochs, by monitored name."""
        return {shown_name(layer): epoch for layer, epoch in self.epochs.items()}

    def check_layers(self, layers: Sequence[str]) -> None:
        """Every scheduled layer has to be monitored."""
        unknown = sorted(set(self.freeze_epochs(layers, None)) - set(layers))
        if unknown:
            raise ValueError(f"Schedule.epochs names layers that are not monitored: {unknown}; monitored: {layers}")
