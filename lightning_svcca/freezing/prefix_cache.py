"""Frozen-prefix output cache: compute a frozen prefix's output once per training sample, then skip the prefix.

Once the lowest monitored layers are frozen (parameters fixed, norms in eval mode), the modules up to the highest
of them (the *boundary*) compute a fixed function of the model's input. :class:`PrefixCache` hooks the model:

* a forward pre-hook on the model keys each sample by the exact bytes of its inputs, with shape and dtype
  (:func:`~lightning_svcca.freezing.cache_keys.sample_keys`), so a cached output is never served for a different
  input, and chooses what the forward pass does (a :class:`~lightning_svcca.freezing.cache_pass.Pass`, in
  :meth:`PrefixCache._begin_pass`);
* when every sample of a batch is cached, the prefix's modules return their input untouched (no compute) and the
  boundary returns the stacked cached outputs; otherwise the batch runs in full and its new outputs are stored;
* the first hit batches after the cache is built (and one in :data:`REVERIFY_EVERY` after that) run in full and are
  checked twice (:mod:`lightning_svcca.freezing.cache_check`): the recomputed boundary output against the cached
  one, and the model's output against a replay of the same forward through the short cut (same random state,
  buffers restored). A mismatch, an error in the replay, or an epoch in which no input repeated turns the cache off
  with a :class:`PrefixCacheWarning`.

When a later freeze extends the prefix, the new cache is built on the old one (``below``): while it fills, a batch
whose samples the old cache holds skips the old prefix and computes only the layers between the two boundaries
(their old outputs are then dropped). The old cache is closed after an epoch in which the new one served every
sample.

Outputs are kept in host memory up to a budget; beyond it they are written in per-batch files to a directory that
:meth:`PrefixCache.close` deletes (:class:`~lightning_svcca.freezing.cache_store.SampleStore`). A spill file that
cannot be written or read back turns the cache off with one warning: it is optional, training goes on. Nothing is
checkpointed: after a resume the cache is rebuilt and verified again.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_svcca.core.safe_files import UnreadableFileError
from lightning_svcca.freezing.cache_check import replay, rng_state, same_outputs, verification_failure
from lightning_svcca.freezing.cache_keys import index_keys, sample_keys
from lightning_svcca.freezing.cache_pass import ForwardPass, Pass, Role, boundary_forward, prefix_forward
from lightning_svcca.freezing.cache_store import SampleStore
from lightning_svcca.freezing.cache_usage import CacheUsage
from lightning_svcca.measures import SimilarityWarning
from lightning_svcca.pipeline.wrappers import modules_by_name

__all__ = ["PrefixCache", "PrefixCacheWarning"]

#: Hit batches checked against a full forward right after the cache is (re)built.
VERIFY_BATCHES = 2
#: After those, one hit batch in this many is checked again.
REVERIFY_EVERY = 200


class PrefixCacheWarning(SimilarityWarning):
    """The frozen-prefix cache was refused or turned off; training goes on without it."""


class _Context(enum.Enum):
    """Which forward passes the cache is serving."""

    #: Training passes: the cache fills, serves and checks itself.
    TRAINING = "training"
    #: Probe passes (:meth:`PrefixCache.serving_probe`): a fully cached pass is served, nothing is stored.
    PROBE = "probe"
    #: The verification's replay of a training pass: its pass was set up by the verification.
    REPLAY = "replay"


class PrefixCache:
    """Caches the output of the frozen modules ``modules`` + ``boundary`` of ``model``, keyed by input content.

    Args:
        model: the module whose forward the training step calls (its inputs are the prefix's inputs).
        modules: the modules that finish before ``boundary`` in the forward pass (all frozen).
        boundary: the last frozen monitored layer; its output is what the rest of the model reads.
        max_bytes: memory for cached outputs (``None``: unbounded); beyond it, outputs go to files.
        spill_dir: called once, at the first spill, for the directory to write to.
        below: the cache of a shorter prefix of the same model (the previous boundary); it hands over its outputs
            while this cache fills, then is closed. One that does not fit (another model, a prefix that is not
            part of this one, or turned off) is closed at once.
        key: ``"bytes"`` (samples keyed by their input bytes) or ``"index"`` (by the dataset index each batch
            carries: :meth:`start_batch`'s ``indices``).
        device_bytes: how much of ``max_bytes`` may stay on the model's device.
        logger: where the cache says when it serves and when it turns off (``None``: silent).
        built_in_epoch: the epoch of the last training batch before the cache was built (``None``: none yet).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[str],
        boundary: str,
        max_bytes: int | None,
        spill_dir: Callable[[], Path],
        below: PrefixCache | None = None,
        *,
        key: str = "bytes",
        device_bytes: int = 0,
        logger: logging.Logger | None = None,
        built_in_epoch: int | None = None,
    ) -> None:
        self.model = model
        self.boundary = boundary
        self.key = key
        self.enabled = True
        self.store = SampleStore(max_bytes, spill_dir, _model_device(model), device_bytes)
        #: This epoch's batches and lookups, the repeat judgement and the timing of served against full steps.
        self.usage = CacheUsage(built_in_epoch)
        #: Since the cache was built: samples served and computed; verified and skipped (served) batches;
        #: batches that filled it from the cache below (only the layers between the boundaries ran); probe passes
        #: served (:meth:`serving_probe`).
        self.hits = self.misses = self.verified = self.skipped_batches = self.extended_batches = 0
        self.probe_batches = self._hit_batches = 0
        self._context, self._pass, self._logger = _Context.TRAINING, ForwardPass(), logger
        #: The batch's dataset indices (``key="index"``) until its first training forward pass takes them.
        self._indices: list[str] | None = None
        self._first_forward = False
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []
        prefix = set(modules)
        # short-cut only the outermost prefix modules: their children never run
        self.outermost = [name for name in modules if name != boundary and not _has_ancestor_in(name, prefix)]
        self._below = _adopt(below, self)
        self._attach()

    # ------------------------------------------------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        """Bytes of cached outputs held in memory."""
        return self.store.memory_bytes

    @property
    def below(self) -> PrefixCache | None:
        """The shorter prefix's cache this one still fills from (``None`` once it is closed)."""
        return self._below

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, key: bytes) -> bool:
        return key in self.store

    def start_batch(self, epoch: int, indices: Sequence[str] | None = None) -> None:
        """Before each training batch: count it, time the one before, turn the cache off when it does not pay.

        ``indices``: the batch's dataset indices (``key="index"``). See :class:`~.cache_usage.CacheUsage`.
        """
        usage = self.usage
        if epoch != usage.epoch and self._below is not None and 0 < usage.lookups == usage.hits:
            self._below.close()  # every sample came from this cache: the one below is no longer needed
            self._below = None
        verdict = usage.start_batch(epoch)
        self._indices, self._first_forward = (None if indices is None else list(indices)), True
        if verdict is not None and verdict.off:
            self.disable(verdict.message, warn=verdict.warn)
        elif verdict is not None:
            self._say(f"frozen-prefix cache up to {self.boundary!r} pays: {verdict.message}")

    def stats(self) -> dict[str, float]:
        """This epoch's share of training batches served from the cache, and the bytes it holds (memory + files)."""
        if not self.enabled:
            return {"served_share": 0.0, "bytes": 0.0}
        return {"served_share": self.usage.served_share(), "bytes": float(self.store.total_bytes)}

    def disable(self, reason: str, *, warn: bool = True) -> None:
        """Turn the cache off for good (logging why; warning too unless ``warn=False``) and free what it holds."""
        if self.enabled:
            self._say(f"frozen-prefix cache up to {self.boundary!r} turned off: {reason}")
            if warn:
                warnings.warn(
                    f"frozen-prefix cache turned off: {reason}. Training goes on without it (the prefix is"
                    " recomputed every step); FreezePolicy(cache_outputs=False) silences this",
                    PrefixCacheWarning,
                    stacklevel=2,
                )
        self.close()

    def close(self) -> None:
        """Remove the hooks and short cuts from the model and delete cached outputs and spill files."""
        self.enabled = False
        self._release_model()
        if self._below is not None:
            self._below.close()
            self._below = None
        self.store.close()

    @contextlib.contextmanager
    def serving_probe(self) -> Iterator[None]:
        """Within it, a forward pass whose samples are all cached skips the prefix, in any mode (a probe pass).

        Nothing is stored or counted towards the training statistics; :attr:`probe_batches` counts the passes
        served. A cache that is turned off serves nothing.
        """
        self._context = _Context.PROBE
        try:
            yield
        finally:
            self._context, self._pass = _Context.TRAINING, ForwardPass()

    def probe_matches(self, forward: Callable[[], Any]) -> bool | None:
        """Whether ``forward()`` (a probe pass) returns the same served from the cache as computed in full.

        ``None`` when the cache could not serve it (its samples are not all cached); ``False`` also when the served
        pass fails. Checks what the training verification cannot: a prefix that computes differently in eval mode,
        or under the probe's precision.
        """
        served_before = self.probe_batches
        try:
            with self.serving_probe():
                short_cut = forward()
        except Exception:  # noqa: BLE001 - a forward that fails when served means "not servable"
            return False
        if self.probe_batches == served_before:
            return None
        return same_outputs(forward(), short_cut)

    # ------------------------------------------------------------------------------------------------------------
    # The model's hooks and short cuts
    # ------------------------------------------------------------------------------------------------------------

    def _attach(self) -> None:
        """Hook the model and patch the forward of the outermost prefix modules and of the boundary."""
        named = modules_by_name(self.model)
        skipped_below = set() if self._below is None else set(self._below.outermost)
        for name in self.outermost:
            role = Role.OLD_BOUNDARY if self._below is not None and name == self._below.boundary else Role.OWN
            role = Role.BELOW if role is Role.OWN and name in skipped_below else role
            self._patch(named[name], prefix_forward(named[name].forward, role, self._current))
        self._patch(named[self.boundary], boundary_forward(named[self.boundary].forward, self._current, self._refuse))
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, with_kwargs=True))

    def _release_model(self) -> None:
        """Take the hooks and short cuts off the model (the cached outputs stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._context is _Context.REPLAY:  # the replay's pass was set by the verification
            self._pass.boundary_done, self._pass.computed = False, None
            return
        self._pass = self._begin_pass(module, args, kwargs)

    def _begin_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> ForwardPass:
        """Choose what this forward pass does with the prefix, counting it: every transition of the cache.

        In a probe pass, ``HIT`` when every sample is cached, else ``OFF``. In training (the model in training mode,
        gradients on, a batch of tensors), by the samples' keys: some sample not cached: ``EXTEND`` when the cache
        below holds them all, else ``FILL``; all cached: ``VERIFY`` for the first :data:`VERIFY_BATCHES` hit
        batches and one in :data:`REVERIFY_EVERY` after them, else ``HIT``. Anything else (eval mode, no gradients,
        no batch, cache off, a batch timed in full as a baseline) is ``OFF``.
        """
        if self._context is _Context.PROBE:
            keys = sample_keys(args, kwargs) if self.enabled and self.key == "bytes" else None
            if not keys or not all(key in self.store for key in keys):
                return ForwardPass()
            served = _serving(self, Pass.HIT, keys, self.store)
            self.probe_batches += served.kind is Pass.HIT
            return served
        if not (self.enabled and module.training and torch.is_grad_enabled()):
            return ForwardPass()
        first, self._first_forward = self._first_forward, False
        if first and self.verified >= VERIFY_BATCHES and self.usage.runs_baseline():
            return ForwardPass()
        keys = _keys(self, args, kwargs, first)
        if keys is None:
            return ForwardPass()
        hit_count = sum(key in self.store for key in keys)
        no_repeats = self.usage.lookup(len(keys), hit_count)
        if no_repeats is not None:
            self.disable(no_repeats)
            return ForwardPass()
        if hit_count < len(keys):
            self.misses += len(keys) - hit_count
            if self._below is not None and all(key in self._below.store for key in keys):
                served = _serving(self, Pass.EXTEND, keys, self._below.store)
                self.extended_batches += served.kind is Pass.EXTEND
                return served
            return ForwardPass(Pass.FILL, keys)
        self.hits += len(keys)
        self._hit_batches += 1
        if self.verified < VERIFY_BATCHES or self._hit_batches % REVERIFY_EVERY == 0:
            return ForwardPass(Pass.VERIFY, keys, rng_before=rng_state())
        if self.skipped_batches == 0:
            self._say(f"frozen-prefix cache up to {self.boundary!r} serves ({len(self)} samples cached and verified)")
        served = _serving(self, Pass.HIT, keys, self.store)
        if served.kind is Pass.HIT:
            self.skipped_batches += 1
            self.usage.mark_served(first)
        return served

    def _say(self, message: str) -> None:
        if self._logger is not None:
            self._logger.info(message)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._context is _Context.REPLAY:
            return
        done, self._pass = self._pass, ForwardPass()
        if done.kind is Pass.OFF:
            return
        if not done.boundary_done:
            self.disable(f"the boundary layer {self.boundary!r} did not run in the model's forward")
            return
        if done.kind in (Pass.FILL, Pass.EXTEND) and done.computed is not None and not _stored(self, done):
            return
        if done.kind is Pass.EXTEND and self._below is not None:
            self._below.store.forget(done.keys)  # moved up: the two caches together hold about one budget
        elif done.kind is Pass.VERIFY:
            self._verify(module, args, kwargs, output, done)

    def _current(self) -> ForwardPass:
        """The forward pass in progress (what the patched forwards read)."""
        return self._pass

    def _refuse(self) -> None:
        """The boundary's output cannot be cached per sample: turn the cache off."""
        self.disable(f"the boundary layer {self.boundary!r} does not return one tensor row per sample")

    def _patch(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        module.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's method
        self._patched.append(module)

    # ------------------------------------------------------------------------------------------------------------
    # Verification
    # ------------------------------------------------------------------------------------------------------------

    def _verify(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, done: ForwardPass) -> None:
        """Cached == recomputed at the boundary, and the short-cut forward gives the model's output."""
        assert done.computed is not None
        served = _gathered(self, self.store, done.keys)
        if served is None:
            return
        cached = served.to(done.computed.device)
        reason = verification_failure(
            self.boundary,
            cached,
            done.computed,
            output,
            lambda: replay(module, args, kwargs, done.rng_before, lambda: self._replaying(cached)),
        )
        if reason is not None:
            self.disable(reason)
            return
        self.verified += 1

    @contextlib.contextmanager
    def _replaying(self, cached: Tensor) -> Iterator[None]:
        """Within it, the model's forward is a ``HIT`` pass serving ``cached`` (the verification's replay)."""
        self._context, self._pass = _Context.REPLAY, ForwardPass(Pass.HIT, served=cached)
        try:
            yield
        finally:
            self._context, self._pass = _Context.TRAINING, ForwardPass()


def _keys(cache: PrefixCache, args: tuple, kwargs: dict, first: bool) -> list[bytes] | None:
    """The samples' keys: their input bytes, or the indices :meth:`PrefixCache.start_batch` was given (taken once)."""
    if cache.key == "bytes":
        return sample_keys(args, kwargs)
    indices, cache._indices = cache._indices, None
    if indices is None and first:
        cache.disable(
            "FreezePolicy(cache_key='index') but a training batch carries no dataset index: wrap the training"
            " dataset in lightning_svcca.freezing.IndexedDataset, or use cache_key='bytes'"
        )
    return None if indices is None else index_keys(indices, args, kwargs)


def _stored(cache: PrefixCache, done: ForwardPass) -> bool:
    """Store the pass's computed outputs; a spill that cannot be written turns the cache off (``False``)."""
    assert done.computed is not None
    try:
        cache.store.store(done.keys, done.computed)
    except OSError as error:
        cache.disable(
            f"{error.strerror or error} (disk full, read-only or not permitted); more memory for it"
            " (FreezePolicy(cache_max_bytes=...)) avoids spilling"
        )
        return False
    return True


def _gathered(cache: PrefixCache, store: SampleStore, keys: list[bytes]) -> Tensor | None:
    """``keys``' cached outputs from ``store``; a spill file that cannot be read back turns the cache off."""
    try:
        return store.gather(keys, _model_device(cache.model))
    except (OSError, UnreadableFileError) as error:
        cache.disable(f"a spill file cannot be read back ({error})")
        return None


def _serving(cache: PrefixCache, kind: Pass, keys: list[bytes], store: SampleStore) -> ForwardPass:
    """A pass of ``kind`` served from ``store``; an ``OFF`` pass when its outputs cannot be read back."""
    served = _gathered(cache, store, keys)
    return ForwardPass() if served is None else ForwardPass(kind, keys, served=served)


def _adopt(below: PrefixCache | None, cache: PrefixCache) -> PrefixCache | None:
    """``below`` when its prefix is part of ``cache``'s and its short cuts can be ``cache``'s; else closed."""
    if below is None:
        return None
    fits = (
        below.enabled
        and below.model is cache.model
        and below.boundary != cache.boundary
        and {*below.outermost, below.boundary} <= set(cache.outermost)
    )
    if not fits:
        below.close()
        return None
    below._release_model()
    if below._below is not None:  # a cache two freezes down: this one's own filling needs only ``below``
        below._below.close()
        below._below = None
    return below


def _has_ancestor_in(name: str, names: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:end]) in names for end in range(1, len(parts)))


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")
