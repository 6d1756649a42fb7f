"""When to freeze a monitored layer: :class:`FreezePolicy`, its decision rule and its presets.

The policy decides from the measured history which layers freeze now (:meth:`FreezePolicy.decide`, testable without
a Trainer): by default when a layer's recent movement has become small against its movement since the start
(``"movement"``, scale-free: the same constants from scratch, fine-tuning and LoRA; see ``docs/freezing.md``), or
by a fixed similarity threshold to an earlier snapshot (``"convergence"``), by the SVCCA paper's linear schedule,
or at explicit epochs; the order (bottom-up) and the bounds (``keep_last``, ``max_frozen``) are applied last.
What a freeze covers is
:func:`~lightning_svcca.freezing.blocks.freeze_blocks`'s business, applying it the
:class:`~lightning_svcca.freezing.freezer.Freezer`'s.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_svcca.core.timeline import fraction_lag
from lightning_svcca.freezing.task_signal import TaskGate, TaskVerdict
from lightning_svcca.pipeline.wrappers import shown_name

__all__ = ["MIN_MOVEMENT", "FreezeDecision", "FreezeMode", "FreezeOrder", "FreezePolicy", "relative_movement"]

FreezeMode = Literal["movement", "convergence", "linear", "schedule"]
FreezeOrder = Literal["bottom_up", "any"]
_MODES = ("movement", "convergence", "linear", "schedule")
_ORDERS = ("bottom_up", "any")
_CONVERGENCE_METRICS = ("svcca", "pwcca", "linear_cka", "cca")
_CACHE_KEYS = ("bytes", "index")
_CACHE_DEVICES = ("auto", "cpu", "device")

#: Below this total movement ``1 - s(t, 0)`` a layer is not judged yet: an unchanged layer measures about 5e-8 (the
#: rounding of float32 activations in its snapshots), so a ratio of such values is noise. A LoRA adapter starts
#: at zero and moves by 1e-6 in its first epochs; fully or LoRA fine-tuned layers reach 1e-2 within a few epochs.
MIN_MOVEMENT = 1e-5
#: ``threshold`` and ``lag`` defaults: they belong to ``mode="convergence"``.
_CONVERGENCE_DEFAULTS = {"threshold": 0.99, "lag": 5}


def relative_movement(recent: float, total: float, measurement: int, fraction: float) -> float:
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
    """
    if total >= 1.0:
        return 0.0
    lag = fraction_lag(measurement, fraction)
    return max(0.0, 1.0 - recent) / (1.0 - total) * (measurement / lag) ** 2


@dataclass
class FreezePolicy:
    """When to freeze a monitored layer.

    Args:
        mode: ``"movement"`` (default): when the layer's relative movement :func:`relative_movement` (its movement
            over the last ``lag_fraction`` of the measurements, against its movement since the first, normalised
            so that a steady pace reads 1) has stayed below ``movement_threshold`` for ``patience`` consecutive
            measurements, from ``min_epochs`` on. A layer with nothing trainable of its own (the embeddings under
            LoRA) counts as converged; one that has moved less than ``MIN_MOVEMENT`` since the start is not judged
            yet (its ratio would be measurement noise), nor is a measurement whose lagged snapshot is the first (its
            relative movement is 1 by definition). ``"convergence"``: when the layer's similarity to its own
            snapshot ``lag`` epochs earlier has stayed at or above ``threshold`` for ``patience`` consecutive
            measurements. ``"linear"``: the SVCCA paper's schedule, layer ``i`` of ``L`` (bottom-up) at epoch
            ``ceil(i / L * max_epochs)``. ``"schedule"``: the epochs given in ``schedule``.
        metric: similarity that decides convergence: ``"svcca"``, ``"pwcca"``, ``"linear_cka"`` or ``"cca"``.
        threshold: ``mode="convergence"``: similarity at or above which a measurement counts as converged.
        lag: ``mode="convergence"``: epochs between the two snapshots compared (a multiple of the callback's
            ``every_n_epochs``).
            Training from scratch, comparing consecutive epochs declares convergence far too early: weights move
            slowly at a small learning rate even while far from their final values. Fine-tuning a pretrained
            model for a few epochs, consecutive epochs with ``patience=2`` do (:meth:`for_fine_tuning`).
        patience: consecutive converged measurements needed.
        min_epochs: no freezing before this many completed epochs.
        order: ``"bottom_up"`` (a layer freezes only once every layer below it, in forward order, is frozen)
            or ``"any"``.
        keep_last: never freeze the last ``keep_last`` monitored layers.
        max_frozen: at most this many layers frozen (``None``: no bound beyond ``keep_last``).
        schedule: ``{layer: epoch}`` for ``mode="schedule"``: the layer freezes once ``epoch`` epochs are done.
        noise_aware: judge convergence on ``(value - baseline) / (1 - baseline)``, with ``baseline`` the same
            measure on the probe with its datapoint pairing shuffled, so CCA's small-probe bias (high values for
            unrelated data when directions are many and datapoints few) cannot pass for convergence. The
            ``"movement"`` rule needs no such correction: the factor ``1 / (1 - baseline)`` cancels in its ratio.
        cache_outputs: once the frozen layers form a prefix of the forward pass (the lowest monitored layers),
            compute each training sample's prefix output once and skip the prefix's forward pass afterwards
            (:mod:`lightning_svcca.freezing.prefix_cache`). Samples are keyed by their exact input bytes; the cache
            checks itself on a sample of batches and turns itself off with a warning where it would change training
            (dropout or batch statistics in the prefix, random augmentation, a prefix that is not a prefix).
            Measurements then reuse the frozen prefix's snapshots, and skip the prefix for a probe drawn from the
            training data (:mod:`lightning_svcca.freezing.frozen_prefix`).
        cache_max_bytes: memory for cached outputs (``None``: unbounded); beyond it they are written to
            files in the run directory, deleted when the fit ends.
        cache_key: how the cache recognises a sample: ``"bytes"`` hashes its input (works with any data, costs a
            host copy and a hash of every batch) or ``"index"``: the dataset index its batch carries (wrap the
            training dataset in :class:`~lightning_svcca.freezing.cache_keys.IndexedDataset`; nothing is hashed).
            See ``docs/prefix_cache.md``.
        cache_device: where cached outputs are kept: ``"cpu"`` (host memory), ``"device"`` (the training device,
            up to ``cache_max_bytes``) or ``"auto"`` (the training device while they fit in a quarter of its free
            memory at the time the cache is built, then host memory).
        lag_fraction: ``mode="movement"``: the recent window, as a fraction ``f`` of the measurements so far: at
            measurement ``t`` a layer is compared with its snapshot ``max(1, floor(f * t + 1/2))`` measurements
            back (and with its first). The monitor keeps the snapshots this reaches.
        movement_threshold: ``mode="movement"``: relative movement below which a measurement counts as converged
            (1 is a steady pace; 0.75: the layer moves at about 87% of its average speed so far, or less).
        task: ``mode="movement"`` and ``"convergence"``: the training loss's say
            (:class:`~lightning_svcca.freezing.task_signal.TaskGate`): no layer freezes before the loss has fallen
            by a real fraction of its start, and once its fall has flattened the task has plateaued and layers may
            freeze while their representations still move. ``None``: the representations decide alone.
    """

    mode: FreezeMode = "movement"
    metric: str = "svcca"
    threshold: float = 0.99
    lag: int = 5
    patience: int = 1
    min_epochs: int = 0
    order: FreezeOrder = "bottom_up"
    keep_last: int = 1
    max_frozen: int | None = None
    schedule: dict[str, int] | None = None
    noise_aware: bool = False
    cache_outputs: bool = False
    cache_max_bytes: int | None = 2**30
    cache_key: Literal["bytes", "index"] = "bytes"
    cache_device: Literal["auto", "cpu", "device"] = "auto"
    lag_fraction: float = 0.5
    movement_threshold: float = 0.75
    task: TaskGate | None = field(default_factory=TaskGate)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"FreezePolicy.mode must be one of {_MODES}, got {self.mode!r}")
        if self.metric not in _CONVERGENCE_METRICS:
            raise ValueError(f"FreezePolicy.metric must be one of {_CONVERGENCE_METRICS}, got {self.metric!r}")
        if self.order not in _ORDERS:
            raise ValueError(f"FreezePolicy.order must be one of {_ORDERS}, got {self.order!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"FreezePolicy.threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.lag_fraction <= 1.0:
            raise ValueError(f"FreezePolicy.lag_fraction must be in (0, 1], got {self.lag_fraction}")
        if self.movement_threshold <= 0.0:
            raise ValueError(f"FreezePolicy.movement_threshold must be > 0, got {self.movement_threshold}")
        changed = [name for name, default in _CONVERGENCE_DEFAULTS.items() if getattr(self, name) != default]
        if self.mode == "movement" and changed:
            raise ValueError(
                f"FreezePolicy: {changed} set for mode='movement', which uses lag_fraction and movement_threshold;"
                " set mode='convergence' for a fixed lag and similarity threshold"
            )
        for name in ("lag", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"FreezePolicy.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_epochs", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"FreezePolicy.{name} must be >= 0, got {getattr(self, name)}")
        if self.cache_max_bytes is not None and self.cache_max_bytes < 0:
            raise ValueError(f"FreezePolicy.cache_max_bytes must be >= 0 or None, got {self.cache_max_bytes}")
        if self.cache_key not in _CACHE_KEYS:
            raise ValueError(f"FreezePolicy.cache_key must be one of {_CACHE_KEYS}, got {self.cache_key!r}")
        if self.cache_device not in _CACHE_DEVICES:
            raise ValueError(f"FreezePolicy.cache_device must be one of {_CACHE_DEVICES}, got {self.cache_device!r}")
        if self.max_frozen is not None and self.max_frozen < 0:
            raise ValueError(f"FreezePolicy.max_frozen must be >= 0 or None, got {self.max_frozen}")
        if self.mode == "schedule" and not self.schedule:
            raise ValueError("FreezePolicy(mode='schedule') needs schedule={layer: epoch, ...}")
        if self.mode != "schedule" and self.schedule:
            raise ValueError(f"FreezePolicy.schedule is only used with mode='schedule', not mode={self.mode!r}")

    @classmethod
    def for_fine_tuning(cls, **overrides: Any) -> FreezePolicy:
        """The convergence policy for fine-tuning a pretrained model for a few epochs, with the prefix cache.

        A pretrained layer settles within a few epochs of fine-tuning, so convergence compares consecutive
        epochs (``lag=1``), and two converged measurements in a row (``patience=2``) guard against a single quiet
        epoch. The top two monitored layers (``keep_last=2``: typically the last block and the new head) keep
        training: they carry the new task, and freezing them costs accuracy for little compute. Measured in
        ``benchmarks/freeze_wallclock.py``, workload (b): see ``docs/freezing.md``.

        Args:
            **overrides: any other :class:`FreezePolicy` field, or one of these to change.
        """
        settings: dict[str, Any] = {
            "mode": "convergence", "lag": 1, "patience": 2, "keep_last": 2, "cache_outputs": True,
        }  # fmt: skip
        return cls(**{**settings, **overrides})

    def freeze_epochs(self, layers: Sequence[str], max_epochs: int | None) -> dict[str, int]:
        """Planned freeze epoch of each layer for the ``linear`` and ``schedule`` modes.

        Scheduled names may hold ``torch.compile``'s ``_orig_mod`` segments, which the monitored names leave out.
        """
        if self.mode == "schedule":
            return {shown_name(layer): epoch for layer, epoch in (self.schedule or {}).items()}
        if self.mode == "linear":
            if not max_epochs or max_epochs < 0:
                raise ValueError("FreezePolicy(mode='linear') needs the Trainer's max_epochs to place its schedule")
            count = len(layers)
            return {layer: math.ceil((i + 1) / count * max_epochs) for i, layer in enumerate(layers)}
        return {}

    def decide(
        self,
        epoch: int,
        layers: Sequence[str],
        frozen: Mapping[str, int],
        streaks: dict[str, int],
        similarities: Mapping[str, float],
        baselines: Mapping[str, float] | None = None,
        max_epochs: int | None = None,
        compared_with: str | None = None,
        initial: Mapping[str, float] | None = None,
        measurement: int | None = None,
        idle: Collection[str] = (),
        task: TaskVerdict | None = None,
        notes: dict[str, str] | None = None,
    ) -> list[FreezeDecision]:
        """Layers to freeze now, bottom-up, with the reason for each; updates ``streaks`` in place.

        Args:
            epoch: completed epochs.
            layers: monitored layers in forward (bottom-up) order.
            frozen: already frozen layers -> epoch.
            streaks: consecutive converged measurements per layer (the policy's counters; checkpointed).
            similarities: this measurement's similarity of each layer to its lagged snapshot: ``lag`` epochs
                earlier (``"convergence"``), ``fraction_lag(measurement, lag_fraction)`` measurements earlier
                (``"movement"``).
            baselines: the shuffled-pairing baseline of each layer (for ``noise_aware``).
            max_epochs: the Trainer's ``max_epochs`` (for ``linear``).
            compared_with: how a reason names the snapshot compared with (default ``"epoch <epoch - lag>"``; when
                measuring every k steps, the lag counts measurements).
            initial: ``"movement"``: each layer's similarity to its first snapshot.
            measurement: ``"movement"``: measurements since the first (``epoch`` when not given).
            idle: ``"movement"``: layers with nothing trainable of their own; they count as converged.
            task: what the training loss says (:meth:`TaskGate.verdict`), for ``movement`` and ``convergence``:
                nothing freezes while it does not allow it; every unfrozen layer is ready once it has flattened.
            notes: filled with each judged but unready layer's numbers (``"movement"``), for the waiting line.
        """
        if self.mode in ("movement", "convergence"):
            if self.mode == "movement":
                t = epoch if measurement is None else measurement
                sides = (similarities, initial or {})
                ready = self._ready_by_movement(epoch, t, layers, frozen, streaks, sides, set(idle), notes)
            else:
                earlier = compared_with or f"epoch {epoch - self.lag}"
                ready = self._ready_by_similarity(epoch, earlier, layers, frozen, streaks, similarities, baselines)
            if task is not None and not task.allows:
                return []
            if task is not None and task.flat and epoch >= self.min_epochs:
                ready = {layer: ready.get(layer) or task.reason for layer in layers if layer not in frozen}
        else:
            planned = self.freeze_epochs(layers, max_epochs)
            ready = {
                layer: f"scheduled for epoch {planned[layer]}" + (" by the linear schedule" * (self.mode == "linear"))
                for layer in layers
                if layer not in frozen and layer in planned and epoch >= planned[layer] and epoch >= self.min_epochs
            }
        return self._admissible(layers, frozen, ready)

    def _ready_by_movement(
        self,
        epoch: int,
        t: int,
        layers: Sequence[str],
        frozen: Mapping[str, int],
        streaks: dict[str, int],
        sides: tuple[Mapping[str, float], Mapping[str, float]],
        idle: set[str],
        notes: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """Layers whose relative movement stayed below ``movement_threshold`` long enough, with the reason.

        ``sides``: each layer's ``s(t, t - lag)`` and ``s(t, 0)``.
        """
        recent, initial = sides
        ready: dict[str, str] = {}
        lag = fraction_lag(t, self.lag_fraction)
        for layer in layers:
            if layer in frozen:
                continue
            if layer in idle:
                streaks[layer] = streaks.get(layer, 0) + 1
                reason = "nothing of its own trains"
            elif t > lag and layer in recent and layer in initial and 1.0 - initial[layer] >= MIN_MOVEMENT:
                rho = relative_movement(recent[layer], initial[layer], t, self.lag_fraction)
                converged = rho < self.movement_threshold
                streaks[layer] = streaks.get(layer, 0) + 1 if converged else 0
                streak = f" for {streaks[layer]} measurement(s)" if converged else ""
                reason = (
                    f"relative movement {rho:.3f} {'<' if converged else '>='} {self.movement_threshold}{streak}"
                    f" (1 - {self.metric}: {1.0 - recent[layer]:.2e} over the last {lag} measurement(s),"
                    f" {1.0 - initial[layer]:.2e} since the start)"
                )
            else:  # not measured, too little movement yet to tell a pace from noise, or t <= lag: the lagged
                # snapshot is the first, so rho = 1 by definition and says nothing (a threshold above 1 would
                # otherwise freeze every layer at the first measurement)
                streaks[layer] = 0
                continue
            if streaks[layer] >= self.patience and epoch >= self.min_epochs:
                ready[layer] = reason
            elif notes is not None:
                notes[layer] = reason
        return ready

    def _ready_by_similarity(
        self,
        epoch: int,
        earlier: str,
        layers: Sequence[str],
        frozen: Mapping[str, int],
        streaks: dict[str, int],
        similarities: Mapping[str, float],
        baselines: Mapping[str, float] | None,
    ) -> dict[str, str]:
        """Layers whose similarity to ``earlier`` stayed at or above ``threshold`` long enough, with the reason."""
        ready: dict[str, str] = {}
        for layer in layers:
            if layer in frozen or layer not in similarities:
                continue
            value = similarities[layer]
            judged, note = value, f"{self.metric} to {earlier} = {value:.4f}"
            if self.noise_aware and baselines and layer in baselines and baselines[layer] < 1.0:
                judged = (value - baselines[layer]) / (1.0 - baselines[layer])
                note += f", {judged:.4f} above the shuffled baseline {baselines[layer]:.4f}"
            streaks[layer] = streaks.get(layer, 0) + 1 if judged >= self.threshold else 0
            if streaks[layer] >= self.patience and epoch >= self.min_epochs:
                ready[layer] = f"{note} >= {self.threshold} for {streaks[layer]} measurement(s)"
        return ready

    def _admissible(
        self, layers: Sequence[str], frozen: Mapping[str, int], ready: Mapping[str, str]
    ) -> list[FreezeDecision]:
        """Apply the order and the bounds to the layers that are ready."""
        limit = len(layers) - self.keep_last
        if self.max_frozen is not None:
            limit = min(limit, self.max_frozen)
        count = sum(1 for layer in layers if layer in frozen)
        decisions = []
        for index, layer in enumerate(layers):
            if layer in frozen:
                continue
            if index >= len(layers) - self.keep_last or count >= limit:
                break
            if layer in ready:
                decisions.append(FreezeDecision(layer, ready[layer]))
                count += 1
            elif self.order == "bottom_up":
                break
        return decisions


@dataclass(frozen=True)
class FreezeDecision:
    """A layer to freeze and why."""

    layer: str
    reason: str
