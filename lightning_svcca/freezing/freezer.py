"""Applying freezes: :class:`Freezer` turns a layer's freeze into fixed parameters and keeps it applied.

A freeze covers a :class:`~lightning_svcca.freezing.blocks.Block` (what
:func:`~lightning_svcca.freezing.blocks.freeze_blocks` assigned to the layer); the
:class:`~lightning_svcca.freezing.policy.FreezePolicy` decided when. The Freezer turns ``requires_grad`` off
(autograd skips their gradients, which is the saving), sets gradients to ``None`` (so no optimizer moves them through
momentum or weight decay) and keeps BatchNorm-style layers in eval mode (running statistics fixed). It re-applies
every freeze after a resume (its state is checkpointed); under DDP the caller rebuilds the wrapper afterwards
(:mod:`lightning_svcca.freezing.strategies`).

Dropout inside a frozen block is left as it is: it keeps regularising what is trained above it, and a frozen
block's parameters do not change either way.

With ``FreezePolicy(cache_outputs=True)`` the :class:`Freezer` also keeps a
:class:`~lightning_svcca.freezing.prefix_cache.PrefixCache` on the frozen prefix (the frozen layers from the
bottom up to the first unfrozen one), so the prefix's forward pass is skipped too; see that module for when it is
refused.
A freeze never takes the last trainable parameters: the Freezer stops one short (:meth:`Freezer.leaves_trainable`).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_svcca.freezing.blocks import Block
from lightning_svcca.freezing.cache_check import prefix_refusal
from lightning_svcca.freezing.cache_keys import take_indices
from lightning_svcca.freezing.policy import FreezePolicy
from lightning_svcca.freezing.prefix_cache import PrefixCache, PrefixCacheWarning
from lightning_svcca.pipeline.wrappers import modules_by_name, named_parameters, parameters_by_name

__all__ = ["DEVICE_SHARE", "Freezer"]

#: ``FreezePolicy(cache_device="auto")``: the share of the device's free memory the cache may fill.
DEVICE_SHARE = 0.25


class Freezer:
    """Applies freezes to a model and keeps them applied (and, if the policy asks, caches the frozen prefix).

    ``hard`` freezing turns ``requires_grad`` off, so the backward pass skips the frozen layers. ``hard=False``
    (for strategies that shard or flatten parameters, where changing ``requires_grad`` mid-run is not
    possible) keeps ``requires_grad`` and drops the frozen parameters' gradients before each optimizer step:
    parameters stay fixed but no compute is saved.

    Args:
        hard: hard or soft freezing (the callback decides at fit start).
        policy: the freeze policy; its ``cache`` (:class:`~lightning_svcca.freezing.policy.PrefixCacheOptions`)
            drives the prefix cache.
        spill_dir: called for a fresh directory when cached outputs outgrow ``cache_max_bytes``.
        logger: where the prefix cache says when it engages, serves and turns off (``None``: silent; the
            monitor passes its runtime's logger on rank zero).
    """

    def __init__(
        self,
        hard: bool = True,
        policy: FreezePolicy | None = None,
        spill_dir: Callable[[], Path] | None = None,
        logger: logging.Logger | None = None,
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
        #: The boundary of a cache that turned off because serving was not faster: that prefix stays uncached, a
        #: longer one (more compute to skip) gets a new cache.
        self._slow_boundary: str | None = None
        self._logger = logger
        #: The epoch of the latest training batch (a cache built before the next one in it starts mid-epoch).
        self._epoch: int | None = None
        #: ``(id(model), its frozen norm modules)``, resolved once per model and freeze set: resolving walks every
        #: module (4 ms per batch on a PEFT-wrapped BERT, 8% of its 56 ms CPU step). Reset wherever ``norm_modules``
        #: changes; the modules held keep that model alive, so its id cannot pass to another one meanwhile.
        self._norms: tuple[int, list[nn.Module]] | None = None

    def leaves_trainable(self, model: nn.Module, block: Block) -> bool:
        """Whether some parameter still trains once ``block`` is frozen too (a freeze never takes the last ones)."""
        taken = set(block.parameters).union(*self.parameters.values()) if self.parameters else set(block.parameters)
        return any(parameter.requires_grad and name not in taken for name, parameter in named_parameters(model))

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
        self._norms = None
        for parameter in self._frozen_parameters(model):
            if self.hard:
                parameter.requires_grad_(False)
            parameter.grad = None
        if norms:
            self.keep_norms_in_eval(model)
        self._update_cache(model)

    def start_batch(self, model: nn.Module, epoch: int, batch: Any = None) -> None:
        """Before each training batch: frozen norms back in eval mode, and the cache told the batch.

        ``batch``: the training batch; the dataset indices of an
        :class:`~lightning_svcca.freezing.cache_keys.IndexedDataset` are taken out of it in place (the training
        step sees the batch without them) and handed to the cache.
        """
        indices = take_indices(batch) if batch is not None else None
        self.keep_norms_in_eval(model)
        if self.cache is not None:
            self.cache.start_batch(epoch, indices)
        self._epoch = epoch

    def cache_stats(self) -> dict[str, float]:
        """The prefix cache's scalars, once one was built or refused (else ``{}``), logged as ``svcca/cache/<name>``.

        ``served_share``: the share of this epoch's training batches whose prefix was served; ``bytes``: what the
        cache holds in memory and in spill files. Both are 0 once it is off.
        """
        if self.cache is not None:
            return self.cache.stats()
        return {"served_share": 0.0, "bytes": 0.0} if self._cache_refused else {}

    def keep_norms_in_eval(self, model: nn.Module) -> None:
        """Put frozen BatchNorm-style modules back in eval mode (Lightning calls ``model.train()`` each epoch)."""
        for module in self._frozen_norms(model):
            module.training = False

    def _frozen_norms(self, model: nn.Module) -> list[nn.Module]:
        if self._norms is None or self._norms[0] != id(model):
            names = [name for block in self.norm_modules.values() for name in block]
            modules = modules_by_name(model) if names else {}
            self._norms = (id(model), [modules[name] for name in names if name in modules])
        return self._norms[1]

    def drop_gradients(self, model: nn.Module) -> None:
        """Soft freezing: clear the frozen parameters' gradients (call before each optimizer step)."""
        for parameter in self._frozen_parameters(model):
            parameter.grad = None

    @property
    def caching(self) -> bool:
        """Whether the policy asks for the frozen-prefix cache."""
        return self.policy is not None and self.policy.cache is not None

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
        self._slow_boundary = None
        self._norms = None

    def _frozen_parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        named = parameters_by_name(model)
        for names in self.parameters.values():
            for name in names:
                if name in named:
                    yield named[name]

    def _update_cache(self, model: nn.Module) -> None:
        """Cache the frozen prefix: the frozen layers at positions 0, 1, ... up to the first unfrozen one."""
        if self.policy is None or self.policy.cache is None or self._cache_refused:
            return
        if self.cache is not None and not self.cache.enabled:
            if self.cache.usage.faster is False:  # not faster on this prefix: a longer one may pay
                self._slow_boundary = self.cache.boundary
            else:  # it turned itself off (and said why): it stays off for this fit
                self._cache_refused = True
            self.cache = None
            if self._cache_refused:
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
        if self.cache is None and boundary == self._slow_boundary:
            return
        below, self.cache = self.cache, None  # the shorter prefix's cache: the new one fills from it
        modules = [name for position in range(count) for name in self.modules.get(by_position[position], [])]
        reason = "soft freezing computes the prefix anyway" if not self.hard else None
        reason = reason or prefix_refusal(model, modules, boundary)
        if reason is not None:
            if below is not None:
                below.close()
            self._cache_refused = True
            message = f"FreezePolicy(cache_outputs=True): the frozen prefix up to {boundary!r} is not cached: {reason}"
            self._say(message)
            warnings.warn(message, PrefixCacheWarning, stacklevel=3)
            return
        self.cache = self._build_cache(model, modules, boundary, below)

    def _build_cache(
        self, model: nn.Module, modules: list[str], boundary: str, below: PrefixCache | None
    ) -> PrefixCache:
        """A cache on the prefix up to ``boundary``, with the policy's options, announced in the log."""
        assert self.policy is not None and self.policy.cache is not None
        options = self.policy.cache
        device_bytes = _device_budget(model, options.device, options.max_bytes)
        cache = PrefixCache(
            model,
            modules,
            boundary,
            options.max_bytes,
            self._spill_dir,
            below=below,
            key=options.key,
            device_bytes=device_bytes,
            logger=self._logger,
            built_in_epoch=self._epoch,
        )
        where = f"on {cache.store.device} up to {device_bytes / 2**20:.0f} MiB, then " if device_bytes else ""
        budget = "unbounded" if options.max_bytes is None else f"{options.max_bytes / 2**20:.0f} MiB"
        self._say(
            f"frozen-prefix cache engaged up to {boundary!r} ({len(cache.outermost) + 1} modules skipped when served):"
            f" samples keyed by {'dataset index' if options.key == 'index' else 'input bytes'}, outputs kept"
            f" {where}in host memory ({budget} in all), then in files; it serves once every sample of a batch is"
            " cached and checked"
        )
        return cache

    def _say(self, message: str) -> None:
        if self._logger is not None:
            self._logger.info(message)

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
        self._norms = None
        self.modules = {layer: list(names) for layer, names in state.get("modules", {}).items()}
        self.positions = {layer: int(position) for layer, position in state.get("positions", {}).items()}


def _device_budget(model: nn.Module, where: str, max_bytes: int | None) -> int:
    """Bytes of cached outputs to keep on the model's device, for ``PrefixCacheOptions.device``."""
    device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    if where == "cpu" or device.type == "cpu":
        return 0
    budget = max_bytes if max_bytes is not None else 2**62
    if where == "device":
        return budget
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return min(budget, int(DEVICE_SHARE * free))
