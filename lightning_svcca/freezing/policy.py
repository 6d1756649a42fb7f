"""When to freeze a monitored layer: :class:`FreezePolicy`, the freeze rule it holds, its order, bounds and presets.

The policy decides from one measurement's :class:`~lightning_svcca.freezing.rules.Evidence` which layers freeze now
(:meth:`FreezePolicy.decide`, testable without a Trainer): its rule (:mod:`~lightning_svcca.freezing.rules`) says
which layers are ready, by default when a layer's recent movement has become small against its movement since the
start (:class:`~lightning_svcca.freezing.rules.Movement`, scale-free: the same constants from scratch, fine-tuning
and LoRA; see ``docs/freezing.md``), or by a fixed similarity threshold to an earlier snapshot
(:class:`~lightning_svcca.freezing.rules.Convergence`), by the SVCCA paper's linear schedule, or at explicit epochs;
the task gate, the order (bottom-up) and the bounds (``keep_last``, ``max_frozen``) are applied last.
What a freeze covers is
:func:`~lightning_svcca.freezing.blocks.freeze_blocks`'s business, applying it the
:class:`~lightning_svcca.freezing.freezer.Freezer`'s.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_svcca.freezing.rules import (
    MIN_MOVEMENT,
    Convergence,
    Evidence,
    FreezeRule,
    LinearSchedule,
    Movement,
    Schedule,
    relative_movement,
)
from lightning_svcca.freezing.task_signal import TaskGate
from lightning_svcca.pipeline.metrics import metrics_where

__all__ = [
    "MIN_MOVEMENT",
    "FreezeDecision",
    "FreezeMode",
    "FreezeOrder",
    "FreezeOutcome",
    "FreezePolicy",
    "PrefixCacheOptions",
    "relative_movement",
]

#: The shorthand ``FreezePolicy(mode=...)``'s names for the rules.
FreezeMode = Literal["movement", "convergence", "linear", "schedule"]
FreezeOrder = Literal["bottom_up", "any"]
_ORDERS = ("bottom_up", "any")
_CONVERGENCE_METRICS = metrics_where("convergence")
_CACHE_KEYS = ("bytes", "index")
_CACHE_DEVICES = ("auto", "cpu", "device")
#: Each shorthand mode's rule and keywords: ``FreezePolicy`` keyword -> the rule's field.
_MODE_KEYWORDS: dict[str, tuple[type[FreezeRule], dict[str, str]]] = {
    "movement": (Movement, {"movement_threshold": "threshold", "lag_fraction": "lag_fraction"}),
    "convergence": (Convergence, {"threshold": "threshold", "lag": "lag", "noise_aware": "noise_aware"}),
    "linear": (LinearSchedule, {}),
    "schedule": (Schedule, {"schedule": "epochs"}),
}
#: The shorthand keywords a mode cannot do without.
_REQUIRED = {"schedule": "schedule={layer: epoch, ...}"}
#: The shorthand cache keywords' defaults: ``FreezePolicy`` keyword -> (:class:`PrefixCacheOptions` field, default).
_CACHE_KEYWORDS: dict[str, tuple[str, Any]] = {
    "cache_max_bytes": ("max_bytes", 2**30),
    "cache_key": ("key", "bytes"),
    "cache_device": ("device", "auto"),
}


@dataclass(frozen=True)
class PrefixCacheOptions:
    """The frozen-prefix cache: once the frozen layers form a prefix of the forward pass, serve its outputs.

    Each training sample's prefix output is computed once and the prefix's forward pass skipped afterwards
    (:mod:`lightning_svcca.freezing.prefix_cache`). The cache checks itself on a sample of batches and turns itself
    off with a warning where it would change training (dropout or batch statistics in the prefix, random
    augmentation, a prefix that is not a prefix). Measurements then reuse the frozen prefix's snapshots, and skip
    the prefix for a probe drawn from the training data (:mod:`lightning_svcca.freezing.frozen_prefix`).

    Args:
        max_bytes: memory for cached outputs (``None``: unbounded); beyond it they are written to files in the
            run directory, deleted when the fit ends.
        key: how the cache recognises a sample: ``"bytes"`` hashes its input (works with any data, costs a host
            copy and a hash of every batch) or ``"index"``: the dataset index its batch carries (wrap the training
            dataset in :class:`~lightning_svcca.freezing.cache_keys.IndexedDataset`; nothing is hashed). See
            ``docs/prefix_cache.md``.
        device: where cached outputs are kept: ``"cpu"`` (host memory), ``"device"`` (the training device, up to
            ``max_bytes``) or ``"auto"`` (the training device while they fit in a quarter of its free memory at the
            time the cache is built, then host memory).
    """

    max_bytes: int | None = 2**30
    key: Literal["bytes", "index"] = "bytes"
    device: Literal["auto", "cpu", "device"] = "auto"

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"PrefixCacheOptions.max_bytes must be >= 0 or None, got {self.max_bytes}")
        if self.key not in _CACHE_KEYS:
            raise ValueError(f"PrefixCacheOptions.key must be one of {_CACHE_KEYS}, got {self.key!r}")
        if self.device not in _CACHE_DEVICES:
            raise ValueError(f"PrefixCacheOptions.device must be one of {_CACHE_DEVICES}, got {self.device!r}")


@dataclass(init=False)
class FreezePolicy:
    """When to freeze a monitored layer: a rule, the task gate, and what every rule shares.

    Args:
        rule: which layers are ready (:mod:`~lightning_svcca.freezing.rules`): :class:`Movement` (default: a layer's
            recent movement against its movement since the start), :class:`Convergence` (its similarity to a
            snapshot a fixed lag earlier), :class:`LinearSchedule` (the SVCCA paper's schedule) or
            :class:`Schedule` (epochs you choose). Each holds only its own parameters.
        task: for the rules that read measurements: the training loss's say
            (:class:`~lightning_svcca.freezing.task_signal.TaskGate`): no layer freezes before the loss has fallen
            by a real fraction of its start, and once its fall has flattened the task has plateaued and layers may
            freeze while their representations still move. ``None``: the representations decide alone.
        metric: similarity that decides convergence: ``"svcca"``, ``"pwcca"``, ``"linear_cka"`` or ``"cca"``.
        patience: consecutive converged measurements needed.
        min_epochs: no freezing before this many completed epochs.
        order: ``"bottom_up"`` (a layer freezes only once every layer below it, in forward order, is frozen)
            or ``"any"``.
        keep_last: never freeze the top ``keep_last`` monitored layers that have something to train (a top layer
            with nothing trainable, such as a LoRA model's head, is not counted), nor any layer above them.
        max_frozen: at most this many layers frozen (``None``: no bound beyond ``keep_last``).
        cache: the frozen-prefix cache's options (:class:`PrefixCacheOptions`); ``None``: no cache.
        mode: shorthand for ``rule``, with the rule's parameters as keywords (kept from the policy's first form):
            ``mode="movement"`` with ``movement_threshold`` and ``lag_fraction``; ``"convergence"`` with
            ``threshold``, ``lag`` and ``noise_aware``; ``"linear"``; ``"schedule"`` with ``schedule``. Give either
            ``rule`` or these.
        threshold: shorthand for ``Convergence(threshold=...)``.
        lag: shorthand for ``Convergence(lag=...)``.
        schedule: shorthand for ``Schedule(epochs=...)``.
        noise_aware: shorthand for ``Convergence(noise_aware=...)``.
        lag_fraction: shorthand for ``Movement(lag_fraction=...)``.
        movement_threshold: shorthand for ``Movement(threshold=...)``.
        cache_outputs: shorthand for ``cache=PrefixCacheOptions(...)`` (``True``), with the ``cache_*`` keywords.
        cache_max_bytes: shorthand for ``PrefixCacheOptions(max_bytes=...)``.
        cache_key: shorthand for ``PrefixCacheOptions(key=...)``.
        cache_device: shorthand for ``PrefixCacheOptions(device=...)``.
    """

    rule: FreezeRule = field(default_factory=Movement)
    task: TaskGate | None = field(default_factory=TaskGate)
    metric: str = "svcca"
    patience: int = 1
    min_epochs: int = 0
    order: FreezeOrder = "bottom_up"
    keep_last: int = 1
    max_frozen: int | None = None
    cache: PrefixCacheOptions | None = None

    def __init__(  # noqa: PLR0913 - the shared settings, then the documented shorthand keywords
        self,
        rule: FreezeRule = Movement(),  # noqa: B008 - frozen, so one shared default is safe
        *,
        task: TaskGate | None = TaskGate(),  # noqa: B008 - frozen, so one shared default is safe
        metric: str = "svcca",
        patience: int = 1,
        min_epochs: int = 0,
        order: FreezeOrder = "bottom_up",
        keep_last: int = 1,
        max_frozen: int | None = None,
        cache: PrefixCacheOptions | None = None,
        mode: FreezeMode | None = None,
        threshold: float | None = None,
        lag: int | None = None,
        schedule: dict[str, int] | None = None,
        noise_aware: bool | None = None,
        lag_fraction: float | None = None,
        movement_threshold: float | None = None,
        cache_outputs: bool | None = None,
        cache_max_bytes: int | None = 2**30,
        cache_key: Literal["bytes", "index"] = "bytes",
        cache_device: Literal["auto", "cpu", "device"] = "auto",
    ) -> None:
        shorthand = {
            "threshold": threshold,
            "lag": lag,
            "schedule": schedule,
            "noise_aware": noise_aware or None,
            "lag_fraction": lag_fraction,
            "movement_threshold": movement_threshold,
        }
        self.rule = _rule(rule, mode, {name: value for name, value in shorthand.items() if value is not None})
        self.task = task
        self.metric = metric
        self.patience = patience
        self.min_epochs = min_epochs
        self.order = order
        self.keep_last = keep_last
        self.max_frozen = max_frozen
        given = {"cache_max_bytes": cache_max_bytes, "cache_key": cache_key, "cache_device": cache_device}
        self.cache = _cache(cache, cache_outputs, given)
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.rule, FreezeRule):
            raise TypeError(
                "FreezePolicy.rule must be a freeze rule (Movement(), Convergence(), LinearSchedule(), Schedule(...)),"
                f" got {self.rule!r}; FreezePolicy(mode=...) names the rules by string"
            )
        if self.metric not in _CONVERGENCE_METRICS:
            raise ValueError(f"FreezePolicy.metric must be one of {_CONVERGENCE_METRICS}, got {self.metric!r}")
        if self.order not in _ORDERS:
            raise ValueError(f"FreezePolicy.order must be one of {_ORDERS}, got {self.order!r}")
        if self.patience < 1:
            raise ValueError(f"FreezePolicy.patience must be >= 1, got {self.patience}")
        for name in ("min_epochs", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"FreezePolicy.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_frozen is not None and self.max_frozen < 0:
            raise ValueError(f"FreezePolicy.max_frozen must be >= 0 or None, got {self.max_frozen}")

    @classmethod
    def for_fine_tuning(cls, **overrides: Any) -> FreezePolicy:
        """The convergence policy for fine-tuning a pretrained model for a few epochs, with the prefix cache.

        A pretrained layer settles within a few epochs of fine-tuning, so convergence compares consecutive
        epochs (``Convergence(lag=1)``), and two converged measurements in a row (``patience=2``) guard against a
        single quiet epoch. The top two monitored layers (``keep_last=2``: typically the last block and the new
        head) keep training: they carry the new task, and freezing them costs accuracy for little compute.
        Measured in ``benchmarks/freeze_wallclock.py``, workload (b): see ``docs/freezing.md``.

        Args:
            **overrides: any other :class:`FreezePolicy` keyword (the shorthand ones included, which change the
                preset's :class:`Convergence` rule), or one of these to change.
        """
        settings: dict[str, Any] = {
            "mode": "convergence", "lag": 1, "patience": 2, "keep_last": 2, "cache_outputs": True,
        }  # fmt: skip
        if "rule" in overrides:
            settings = {name: value for name, value in settings.items() if name not in ("mode", "lag")}
        if "cache" in overrides:
            settings.pop("cache_outputs")
        return cls(**{**settings, **overrides})

    @property
    def cache_outputs(self) -> bool:
        """Whether the frozen-prefix cache is on (``cache`` is set)."""
        return self.cache is not None

    def freeze_epochs(self, layers: Sequence[str], max_epochs: int | None) -> dict[str, int]:
        """Planned freeze epoch of each layer, for the rules that plan them (``{}`` for the others)."""
        return self.rule.freeze_epochs(layers, max_epochs)

    def decide(self, evidence: Evidence, streaks: Mapping[str, int] | None = None) -> FreezeOutcome:
        """Layers to freeze now, bottom-up, with the reason for each, from one measurement's ``evidence``.

        ``streaks``: each layer's consecutive converged measurements so far (``None``: none); the outcome carries
        the updated counts, which the caller keeps (and checkpoints). Nothing passed in is changed.

        The rule says which layers are ready; then ``min_epochs``; then the task gate, for a rule that reads it
        (:attr:`~lightning_svcca.freezing.rules.FreezeRule.reads_task`): nothing freezes while
        ``evidence.task.allows`` is false, and once the task has plateaued (``evidence.task.flat``) every unfrozen
        layer is ready; last the order and the bounds.
        """
        found = self.rule.readiness(evidence, streaks or {}, self.patience)
        ready, notes = dict(found.ready), dict(found.notes)
        early = evidence.epoch < self.min_epochs
        if early:
            notes.update({layer: f"{why}; freezing starts at epoch {self.min_epochs}" for layer, why in ready.items()})
            ready = {}
        task = evidence.task if self.rule.reads_task else None
        if task is not None and not task.allows:
            return FreezeOutcome([], found.streaks, notes)
        if task is not None and task.flat and not early:
            ready = {layer: ready.get(layer) or task.reason for layer in evidence.unfrozen()}
        admissible = self._admissible(evidence.layers, evidence.frozen, ready, evidence.idle)
        return FreezeOutcome(admissible, found.streaks, notes)

    def kept_from(self, layers: Sequence[str], idle: Collection[str] = ()) -> int:
        """Where the layers ``keep_last`` keeps training start: freezing stops below this index of ``layers``.

        Those are the top ``keep_last`` monitored layers that have something to train (``idle`` ones, such as a
        LoRA model's head, have nothing to keep training and are not counted); layers above them never freeze.
        """
        training = [index for index, layer in enumerate(layers) if layer not in idle]
        if self.keep_last == 0 or not training:
            return len(layers)
        return training[max(0, len(training) - self.keep_last)]

    def _admissible(
        self, layers: Sequence[str], frozen: Mapping[str, int], ready: Mapping[str, str], idle: Collection[str]
    ) -> list[FreezeDecision]:
        """Apply the order and the bounds to the layers that are ready."""
        stop = self.kept_from(layers, idle)
        limit = stop if self.max_frozen is None else min(stop, self.max_frozen)
        count = sum(1 for layer in layers if layer in frozen)
        decisions = []
        for index, layer in enumerate(layers):
            if layer in frozen:
                continue
            if index >= stop or count >= limit:
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


@dataclass(frozen=True)
class FreezeOutcome:
    """What :meth:`FreezePolicy.decide` found at one measurement.

    Attributes:
        decisions: the layers to freeze now, bottom-up, each with its reason.
        streaks: consecutive converged measurements per layer after this measurement (keep them for the next).
        notes: layer -> its numbers, for each judged layer that is not ready (the waiting line names the lowest).
    """

    decisions: list[FreezeDecision]
    streaks: dict[str, int]
    notes: dict[str, str]


def _rule(rule: FreezeRule, mode: str | None, keywords: dict[str, Any]) -> FreezeRule:
    """The policy's rule: ``rule``, or the one the shorthand ``mode`` and rule keywords name (default Movement).

    A rule equal to the default ``Movement()`` gives way to the shorthand (LightningCLI passes the default along).
    """
    if mode is None and not keywords:
        return rule
    if rule != Movement():
        raise ValueError(
            f"FreezePolicy: give rule= or the shorthand {['mode', *keywords] if mode else list(keywords)}, not both"
        )
    mode = mode or "movement"
    if mode not in _MODE_KEYWORDS:
        raise ValueError(f"FreezePolicy.mode must be one of {tuple(_MODE_KEYWORDS)}, got {mode!r}")
    kind, fields = _MODE_KEYWORDS[mode]
    foreign = [name for name in keywords if name not in fields]
    if foreign:
        owners = [other for other, (_, names) in _MODE_KEYWORDS.items() if set(foreign) <= set(names)]
        hint = f"; set mode={owners[0]!r} (rule={_MODE_KEYWORDS[owners[0]][0].__name__}(...))" if owners else ""
        raise ValueError(f"FreezePolicy: {foreign} set for mode={mode!r}, which does not use them{hint}")
    missing = [form for name, form in _REQUIRED.items() if name in fields and not keywords.get(name)]
    if missing:
        raise ValueError(f"FreezePolicy(mode={mode!r}) needs {missing[0]}")
    return kind(**{fields[name]: value for name, value in keywords.items()})


def _cache(
    cache: PrefixCacheOptions | None, outputs: bool | None, keywords: dict[str, Any]
) -> PrefixCacheOptions | None:
    """The cache options: ``cache``, or the ones the shorthand ``cache_outputs`` and ``cache_*`` keywords give."""
    changed = {name: value for name, value in keywords.items() if value != _CACHE_KEYWORDS[name][1]}
    if outputs is None and not changed:
        return cache
    if cache is not None:
        raise ValueError("FreezePolicy: give cache=PrefixCacheOptions(...) or the cache_* shorthand, not both")
    if not outputs:
        if changed:
            raise ValueError(f"FreezePolicy: {sorted(changed)} only apply with cache_outputs=True")
        return None
    return PrefixCacheOptions(**{_CACHE_KEYWORDS[name][0]: value for name, value in keywords.items()})
