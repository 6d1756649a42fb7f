"""Freeze training: stop training layers that have converged, bottom-up.

:class:`FreezePolicy` decides *when* (convergence measured by the callback, the SVCCA paper's linear schedule,
or explicit epochs). :func:`freeze_blocks` decides *what* a layer's freeze covers: the parameters of the modules
that ran, in the probe's forward pass, after the previous monitored layer and up to this one. :class:`Freezer`
applies it: ``requires_grad`` off (autograd skips their gradients, which is the saving), gradients set to
``None`` (so no optimizer moves them through momentum or weight decay), BatchNorm-style layers in eval mode
(running statistics fixed), and under DDP a rebuilt wrapper whose reducer only tracks trainable parameters.

Dropout inside a frozen block is left as it is: it keeps regularising what is trained above it, and a frozen
block's parameters do not change either way.

With ``FreezePolicy(cache_outputs=True)`` the :class:`Freezer` also keeps a
:class:`~lightning_svcca.freezing.prefix_cache.PrefixCache` on the frozen prefix (the frozen layers from the
bottom up to the first unfrozen one), so the prefix's forward pass is skipped too; see that module for when it is
refused.
A freeze never takes the last trainable parameters: the Freezer stops one short (:meth:`Freezer.leaves_trainable`).
"""

from __future__ import annotations

import gc
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parallel import DistributedDataParallel

from lightning_svcca.freezing.prefix_cache import PrefixCache, PrefixCacheWarning, prefix_refusal

__all__ = [
    "Block",
    "FreezeDecision",
    "FreezePolicy",
    "Freezer",
    "freeze_blocks",
    "is_hard_freeze_supported",
    "rebuild_ddp_wrapper",
]

FreezeMode = Literal["convergence", "linear", "schedule"]
FreezeOrder = Literal["bottom_up", "any"]
_MODES = ("convergence", "linear", "schedule")
_ORDERS = ("bottom_up", "any")
_CONVERGENCE_METRICS = ("svcca", "pwcca", "linear_cka", "cca")


@dataclass
class FreezePolicy:
    """When to freeze a monitored layer.

    Args:
        mode: ``"convergence"``: when the layer's similarity to its own snapshot ``lag`` epochs earlier has
            stayed at or above ``threshold`` for ``patience`` consecutive measurements, from ``min_epochs`` on.
            ``"linear"``: the SVCCA paper's schedule, layer ``i`` of ``L`` (bottom-up) at epoch
            ``ceil(i / L * max_epochs)``. ``"schedule"``: the epochs given in ``schedule``.
        metric: similarity that decides convergence: ``"svcca"``, ``"pwcca"``, ``"linear_cka"`` or ``"cca"``.
        threshold: similarity at or above which a measurement counts as converged.
        lag: epochs between the two snapshots compared (a multiple of the callback's ``every_n_epochs``).
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
            unrelated data when directions are many and datapoints few) cannot pass for convergence.
        cache_outputs: once the frozen layers form a prefix of the forward pass (the lowest monitored layers),
            compute each training sample's prefix output once and skip the prefix's forward pass afterwards
            (:mod:`lightning_svcca.freezing.prefix_cache`). Samples are keyed by their exact input bytes; the cache
            checks itself on a sample of batches and turns itself off with a warning where it would change training
            (dropout or batch statistics in the prefix, random augmentation, a prefix that is not a prefix).
            Measurements then reuse the frozen prefix's snapshots, and skip the prefix for a probe drawn from the
            training data (:mod:`lightning_svcca.freezing.frozen_prefix`).
        cache_max_bytes: host memory for cached outputs (``None``: unbounded); beyond it they are written to
            files in the run directory, deleted when the fit ends.
    """

    mode: FreezeMode = "convergence"
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

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"FreezePolicy.mode must be one of {_MODES}, got {self.mode!r}")
        if self.metric not in _CONVERGENCE_METRICS:
            raise ValueError(f"FreezePolicy.metric must be one of {_CONVERGENCE_METRICS}, got {self.metric!r}")
        if self.order not in _ORDERS:
            raise ValueError(f"FreezePolicy.order must be one of {_ORDERS}, got {self.order!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"FreezePolicy.threshold must be in (0, 1], got {self.threshold}")
        for name in ("lag", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"FreezePolicy.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_epochs", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"FreezePolicy.{name} must be >= 0, got {getattr(self, name)}")
        if self.cache_max_bytes is not None and self.cache_max_bytes < 0:
            raise ValueError(f"FreezePolicy.cache_max_bytes must be >= 0 or None, got {self.cache_max_bytes}")
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
        settings: dict[str, Any] = {"lag": 1, "patience": 2, "keep_last": 2, "cache_outputs": True}
        return cls(**{**settings, **overrides})

    def freeze_epochs(self, layers: Sequence[str], max_epochs: int | None) -> dict[str, int]:
        """Planned freeze epoch of each layer for the ``linear`` and ``schedule`` modes."""
        if self.mode == "schedule":
            return dict(self.schedule or {})
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
    ) -> list[FreezeDecision]:
        """Layers to freeze now, bottom-up, with the reason for each; updates ``streaks`` in place.

        Args:
            epoch: completed epochs.
            layers: monitored layers in forward (bottom-up) order.
            frozen: already frozen layers -> epoch.
            streaks: consecutive converged measurements per layer (the policy's counters; checkpointed).
            similarities: this measurement's similarity of each layer to its snapshot ``lag`` epochs earlier.
            baselines: the shuffled-pairing baseline of each layer (for ``noise_aware``).
            max_epochs: the Trainer's ``max_epochs`` (for ``linear``).
            compared_with: how a reason names the snapshot compared with (default ``"epoch <epoch - lag>"``; when
                measuring every k steps, the lag counts measurements).
        """
        ready: dict[str, str] = {}
        if self.mode == "convergence":
            for layer in layers:
                if layer in frozen or layer not in similarities:
                    continue
                value = similarities[layer]
                earlier = compared_with or f"epoch {epoch - self.lag}"
                judged, note = value, f"{self.metric} to {earlier} = {value:.4f}"
                if self.noise_aware and baselines and layer in baselines and baselines[layer] < 1.0:
                    judged = (value - baselines[layer]) / (1.0 - baselines[layer])
                    note += f", {judged:.4f} above the shuffled baseline {baselines[layer]:.4f}"
                streaks[layer] = streaks.get(layer, 0) + 1 if judged >= self.threshold else 0
                if streaks[layer] >= self.patience and epoch >= self.min_epochs:
                    ready[layer] = f"{note} >= {self.threshold} for {streaks[layer]} measurement(s)"
        else:
            planned = self.freeze_epochs(layers, max_epochs)
            for layer in layers:
                if layer not in frozen and layer in planned and epoch >= planned[layer] and epoch >= self.min_epochs:
                    ready[layer] = f"scheduled for epoch {planned[layer]}" + (
                        " by the linear schedule" if self.mode == "linear" else ""
                    )
        return self._admissible(layers, frozen, ready)

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


@dataclass
class Block:
    """What freezing one monitored layer covers."""

    parameters: list[str] = field(default_factory=list)
    norm_modules: list[str] = field(default_factory=list)
    #: Every module that finished in this block's part of the forward pass (what a prefix cache skips).
    modules: list[str] = field(default_factory=list)
    #: The layer's position among the monitored layers, bottom-up.
    index: int = 0


def freeze_blocks(completion: Sequence[str], layers: Sequence[str], model: nn.Module) -> dict[str, Block]:
    """Split the modules that ran in the probe's forward pass into one block per monitored layer.

    A layer's block holds the parameters (and BatchNorm-style modules) of the modules that finished after the
    previous monitored layer and up to this one. A module that ran in several blocks (shared weights) belongs
    to the last, and one that also ran after the last monitored layer belongs to none: freezing a layer never
    freezes weights that a trained layer above still uses. Parameters that never ran are in no block.

    Args:
        completion: module names in the order they finished during the forward pass (repeats allowed).
        layers: monitored layers in forward order.
        model: the model the names refer to.
    """
    modules = dict(model.named_modules())
    owner: dict[str, int] = {}
    index = 0
    for name in completion:
        owner[name] = index
        if index < len(layers) and name == layers[index]:
            index += 1
    # A parameter belongs to the last block any of its modules ran in; running after every monitored layer
    # (block index len(layers), "above the top") means it is never frozen.
    top = len(layers)
    parameter_block: dict[int, tuple[int, str]] = {}
    blocks = {layer: Block(index=index) for index, layer in enumerate(layers)}
    position = 0
    for name in completion:
        if position < len(layers) and name and name not in blocks[layers[position]].modules:
            blocks[layers[position]].modules.append(name)
        if position < len(layers) and name == layers[position]:
            position += 1
    for name, block_index in owner.items():
        module = modules.get(name)
        if module is None:
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            full_name = f"{name}.{parameter_name}" if name else parameter_name
            known = parameter_block.get(id(parameter))
            parameter_block[id(parameter)] = (
                (max(block_index, known[0]), known[1]) if known else (block_index, full_name)
            )
        if block_index < top and _has_running_stats(module):
            blocks[layers[block_index]].norm_modules.append(name)
    for block_index, full_name in parameter_block.values():
        if block_index < top:
            blocks[layers[block_index]].parameters.append(full_name)
    return blocks


class Freezer:
    """Applies freezes to a model and keeps them applied (and, if the policy asks, caches the frozen prefix).

    ``hard`` freezing turns ``requires_grad`` off, so the backward pass skips the frozen layers. ``hard=False``
    (for strategies that shard or flatten parameters, where changing ``requires_grad`` mid-run is not
    possible) keeps ``requires_grad`` and drops the frozen parameters' gradients before each optimizer step:
    parameters stay fixed but no compute is saved.

    Args:
        hard: hard or soft freezing (the callback decides at fit start).
        policy: the freeze policy; its ``cache_outputs`` and ``cache_max_bytes`` drive the prefix cache.
        spill_dir: called for a fresh directory when cached outputs outgrow ``cache_max_bytes``.
    """

    def __init__(
        self, hard: bool = True, policy: FreezePolicy | None = None, spill_dir: Callable[[], Path] | None = None
    ) -> None:
        self.hard = hard
        self.policy = policy
        self.parameters: dict[str, list[str]] = {}
        self.norm_modules: dict[str, list[str]] = {}
        #: Frozen layer -> the modules of its block and its position bottom-up (what the prefix cache needs).
        self.modules: dict[str, list[str]] = {}
        self.positions: dict[str, int] = {}
        self.cache: PrefixCache | None = None
        self._spill_dir = spill_dir or (lambda: Path(tempfile.mkdtemp(prefix="svcca_prefix_cache_")))
        self._cache_refused = False

    def leaves_trainable(self, model: nn.Module, block: Block) -> bool:
        """Whether some parameter still trains once ``block`` is frozen too (a freeze never takes the last ones)."""
        taken = set(block.parameters).union(*self.parameters.values()) if self.parameters else set(block.parameters)
        return any(parameter.requires_grad and name not in taken for name, parameter in model.named_parameters())

    def freeze(self, model: nn.Module, layer: str, block: Block) -> None:
        """Freeze one layer's block."""
        self.parameters[layer] = list(block.parameters)
        self.norm_modules[layer] = list(block.norm_modules)
        self.modules[layer] = list(block.modules)
        self.positions[layer] = block.index
        self.apply(model)

    def apply(self, model: nn.Module, *, norms: bool = True) -> None:
        """(Re-)apply every freeze: after a freeze and after a resume; then (re)build the prefix cache.

        ``norms=False`` leaves BatchNorm modes alone (the callback restores eval mode at each batch start, and
        switching before the fit loop starts makes Lightning warn about modules in eval mode).
        """
        for parameter in self._frozen_parameters(model):
            if self.hard:
                parameter.requires_grad_(False)
            parameter.grad = None
        if norms:
            self.keep_norms_in_eval(model)
        self._update_cache(model)

    def start_batch(self, model: nn.Module, epoch: int) -> None:
        """Before each training batch: frozen norms back in eval mode, and the cache told the epoch."""
        if self.norm_modules:
            self.keep_norms_in_eval(model)
        if self.cache is not None:
            self.cache.start_epoch(epoch)

    def keep_norms_in_eval(self, model: nn.Module) -> None:
        """Put frozen BatchNorm-style modules back in eval mode (Lightning calls ``model.train()`` each epoch)."""
        modules = dict(model.named_modules())
        for names in self.norm_modules.values():
            for name in names:
                if name in modules:
                    modules[name].training = False

    def drop_gradients(self, model: nn.Module) -> None:
        """Soft freezing: clear the frozen parameters' gradients (call before each optimizer step)."""
        for parameter in self._frozen_parameters(model):
            parameter.grad = None

    @property
    def caching(self) -> bool:
        """Whether the policy asks for the frozen-prefix cache."""
        return self.policy is not None and self.policy.cache_outputs

    def cached_layers(self) -> list[str]:
        """The frozen layers of the prefix cache, bottom-up, once it has verified them; ``[]`` before or without.

        Their outputs are a fixed function of the model's input: the cache recomputed them and found its copies.
        """
        cache = self.cache
        if cache is None or not cache.enabled or not cache.verified or cache.boundary not in self.positions:
            return []
        top = self.positions[cache.boundary]
        return sorted((layer for layer, at in self.positions.items() if at <= top), key=self.positions.__getitem__)

    def close(self) -> None:
        """Take the prefix cache off the model and delete what it holds (at the end of a fit)."""
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        self._cache_refused = False

    def _frozen_parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        named = dict(model.named_parameters())
        for names in self.parameters.values():
            for name in names:
                if name in named:
                    yield named[name]

    def _update_cache(self, model: nn.Module) -> None:
        """Cache the frozen prefix: the frozen layers at positions 0, 1, ... up to the first unfrozen one."""
        if self.policy is None or not self.policy.cache_outputs or self._cache_refused:
            return
        if self.cache is not None and not self.cache.enabled:
            self._cache_refused = True  # it turned itself off (and said why): it stays off for this fit
            self.cache = None
            return
        by_position = {position: layer for layer, position in self.positions.items()}
        count = 0
        while count in by_position:
            count += 1
        if count == 0:
            return
        boundary = by_position[count - 1]
        if self.cache is not None and self.cache.boundary == boundary and self.cache.model is model:
            return
        below, self.cache = self.cache, None  # the shorter prefix's cache: the new one fills from it
        modules = [name for position in range(count) for name in self.modules.get(by_position[position], [])]
        reason = "soft freezing computes the prefix anyway" if not self.hard else None
        reason = reason or prefix_refusal(model, modules, boundary)
        if reason is not None:
            if below is not None:
                below.close()
            self._cache_refused = True
            warnings.warn(
                f"FreezePolicy(cache_outputs=True): the frozen prefix up to {boundary!r} is not cached: {reason}",
                PrefixCacheWarning,
                stacklevel=3,
            )
            return
        self.cache = PrefixCache(model, modules, boundary, self.policy.cache_max_bytes, self._spill_dir, below=below)

    def state_dict(self) -> dict[str, Any]:
        """Plain state for checkpoints (the cache itself is not saved: it is rebuilt and verified after a resume)."""
        return {
            "parameters": dict(self.parameters),
            "norm_modules": dict(self.norm_modules),
            "modules": dict(self.modules),
            "positions": dict(self.positions),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.parameters = {layer: list(names) for layer, names in state.get("parameters", {}).items()}
        self.norm_modules = {layer: list(names) for layer, names in state.get("norm_modules", {}).items()}
        self.modules = {layer: list(names) for layer, names in state.get("modules", {}).items()}
        self.positions = {layer: int(position) for layer, position in state.get("positions", {}).items()}


def rebuild_ddp_wrapper(strategy: Any) -> bool:
    """Re-wrap the model in a fresh DistributedDataParallel after ``requires_grad`` changed.

    DDP's reducer fixes the set of parameters it expects gradients for when it is built; a parameter that stops
    requiring gradients later makes the next backward fail ("Expected to have finished reduction in the prior
    iteration"). A new wrapper tracks only the trainable parameters. Every process must call this at the same
    point: building DDP broadcasts the module's state from rank 0.

    Returns:
        Whether a wrapper was rebuilt (``False`` when the strategy does not wrap the model in DDP).
    """
    wrapper = getattr(strategy, "model", None)
    if not isinstance(wrapper, DistributedDataParallel) or not hasattr(strategy, "_setup_model"):
        return False
    module = wrapper.module
    if not any(parameter.requires_grad for parameter in module.parameters()):
        raise ValueError("every parameter is frozen: DDP needs at least one trainable parameter")
    reducer = getattr(wrapper, "reducer", None)
    if reducer is not None and hasattr(reducer, "_remove_autograd_hooks"):
        reducer._remove_autograd_hooks()
    strategy.model = strategy._setup_model(module)
    if hasattr(strategy, "_register_ddp_hooks"):
        strategy._register_ddp_hooks()
    del wrapper, reducer
    gc.collect()
    return True


def is_hard_freeze_supported(strategy: Any) -> bool:
    """Whether ``requires_grad`` may change mid-run: the model is unwrapped (one device) or wrapped in DDP.

    Sharding wrappers (FSDP, DeepSpeed) flatten parameters into buffers fixed at wrap time.
    """
    wrapper = getattr(strategy, "model", None)
    return wrapper is getattr(strategy, "lightning_module", None) or isinstance(wrapper, DistributedDataParallel)


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, _InstanceNorm)) and bool(getattr(module, "track_running_stats", False))
