"""Frozen-prefix output cache: compute a frozen prefix's output once per training sample, then skip the prefix.

Once the lowest monitored layers are frozen (parameters fixed, norms in eval mode), the modules up to the highest
of them (the *boundary*) compute a fixed function of the model's input. :class:`PrefixCache` hooks the model:

* a forward pre-hook on the model keys each sample by the exact bytes of its inputs (with shape and dtype), so a
  cached output is never served for a different input;
* when every sample of a batch is cached, the prefix's modules return their input untouched (no compute) and the
  boundary returns the stacked cached outputs; otherwise the batch runs in full and its new outputs are stored;
* the first hit batches after the cache is built (and one in :data:`REVERIFY_EVERY` after that) run in full and are
  checked twice: the recomputed boundary output against the cached one, and the model's output against a replay
  of the same forward through the short cut (same random state, buffers restored). A mismatch, an error in the
  replay, or an epoch in which no input repeated turns the cache off with a :class:`PrefixCacheWarning`.

When a later freeze extends the prefix, the new cache is built on the old one (``below``): while it fills, a batch
whose samples the old cache holds skips the old prefix and computes only the layers between the two boundaries
(their old outputs are then dropped). The old cache is closed after an epoch in which the new one served every
sample.

Outputs are kept in host memory up to a budget; beyond it they are written in per-batch files to a directory that
:meth:`PrefixCache.close` deletes. Nothing is checkpointed: after a resume the cache is rebuilt and verified again.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_svcca.measures import SimilarityWarning

__all__ = ["PrefixCache", "PrefixCacheWarning", "prefix_refusal"]

#: Hit batches checked against a full forward right after the cache is (re)built.
VERIFY_BATCHES = 2
#: After those, one hit batch in this many is checked again.
REVERIFY_EVERY = 200
#: An epoch (after the one that filled the cache) where fewer lookups than this share hit turns the cache off.
MIN_HIT_RATE = 0.01


class PrefixCacheWarning(SimilarityWarning):
    """The frozen-prefix cache was refused or turned off; training goes on without it."""


def prefix_refusal(model: nn.Module, modules: Sequence[str], boundary: str) -> str | None:
    """Why the modules up to ``boundary`` cannot be cached, or ``None`` when they can (checked before caching).

    The prefix must be deterministic and fixed: no trainable parameter (one shared with a layer above would
    change), no active dropout, no normalisation by batch statistics.
    """
    named = dict(model.named_modules())
    if boundary not in named:
        return f"the boundary layer {boundary!r} is not a module of the model"
    for name in (*modules, boundary):
        module = named.get(name)
        if module is None:
            return f"module {name!r} of the frozen prefix is not in the model"
        for parameter_name, parameter in module.named_parameters():
            if parameter.requires_grad:
                return f"parameter '{name}.{parameter_name}' in the frozen prefix still trains (shared above?)"
        for sub_name, sub in module.named_modules():
            full = f"{name}.{sub_name}" if sub_name else name
            if isinstance(sub, _DropoutNd) and sub.p > 0:
                return f"dropout {full!r} is in the frozen prefix, so its output is random in training"
            if isinstance(sub, (_BatchNorm, _InstanceNorm)) and not getattr(sub, "track_running_stats", False):
                return f"{full!r} normalises by batch statistics, so a sample's output depends on its batch"
    return None


class PrefixCache:
    """Caches the output of the frozen modules ``modules`` + ``boundary`` of ``model``, keyed by input content.

    Args:
        model: the module whose forward the training step calls (its inputs are the prefix's inputs).
        modules: the modules that finish before ``boundary`` in the forward pass (all frozen).
        boundary: the last frozen monitored layer; its output is what the rest of the model reads.
        max_bytes: host memory for cached outputs (``None``: unbounded); beyond it, outputs go to files.
        spill_dir: called once, at the first spill, for the directory to write to.
        below: the cache of a shorter prefix of the same model (the previous boundary); it hands over its outputs
            while this cache fills, then is closed. One that does not fit (another model, a prefix that is not
            part of this one, or turned off) is closed at once.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[str],
        boundary: str,
        max_bytes: int | None,
        spill_dir: Callable[[], Path],
        below: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.boundary = boundary
        self.max_bytes = max_bytes
        self.enabled = True
        #: Counters since the cache was built: samples served from it, samples computed, verified batches.
        self.hits = 0
        self.misses = 0
        self.verified = 0
        self.skipped_batches = 0
        #: Batches that filled this cache from the cache below (only the layers between the boundaries ran).
        self.extended_batches = 0
        #: Probe passes served (:meth:`serving_probe`).
        self.probe_batches = 0
        self._probe = False
        self._spill_dir_factory = spill_dir
        self._spill_dir: Path | None = None
        self._memory: dict[bytes, Tensor] = {}
        self._memory_bytes = 0
        self._spilled: dict[bytes, tuple[int, int]] = {}
        self._files: list[Path] = []
        self._mapped: dict[int, Tensor] = {}
        self._mode: str | None = None
        self._keys: list[bytes] = []
        self._served: Tensor | None = None
        self._boundary_done = False
        self._replaying = False
        self._rng_before: list[Tensor] | None = None
        self._computed: Tensor | None = None
        self._hit_batches = 0
        self._epoch: int | None = None
        self._epochs_seen = 0
        self._epoch_hits = 0
        self._epoch_lookups = 0
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []
        named = dict(model.named_modules())
        prefix = set(modules)
        # short-cut only the outermost prefix modules: their children never run
        outermost = [name for name in modules if name != boundary and not _has_ancestor_in(name, prefix)]
        self._below = self._adopt(below, outermost)
        skipped_below = set() if self._below is None else set(self._below.outermost)
        for name in outermost:
            role = "below" if self._below is not None and name == self._below.boundary else None
            role = role or ("skip" if name in skipped_below else None)
            self._patch(named[name], self._prefix_forward(named[name], role))
        self._patch(named[boundary], self._boundary_forward(named[boundary]))
        self.outermost = outermost
        self._handles.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_forward, with_kwargs=True))

    # ------------------------------------------------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        """Bytes of cached outputs held in memory."""
        return self._memory_bytes

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def __contains__(self, key: bytes) -> bool:
        return key in self._memory or key in self._spilled

    def start_epoch(self, epoch: int) -> None:
        """Track epochs: an epoch after the filling one in which inputs did not repeat turns the cache off."""
        if epoch == self._epoch:
            return
        if self._epoch is not None:
            if self._below is not None and 0 < self._epoch_lookups == self._epoch_hits:
                self._below.close()  # every sample came from this cache: the one below is no longer needed
                self._below = None
            self._epochs_seen += 1
            judged = self._epochs_seen >= 2 and self._epoch_lookups > 0
            if judged and self._epoch_hits < MIN_HIT_RATE * self._epoch_lookups:
                self.disable(
                    f"training inputs did not repeat between epochs ({self._epoch_hits} of {self._epoch_lookups}"
                    " samples seen before): random augmentation upstream, or data that changes every epoch"
                )
        self._epoch, self._epoch_hits, self._epoch_lookups = epoch, 0, 0

    def disable(self, reason: str) -> None:
        """Turn the cache off for good (warning why) and free what it holds; the model runs in full again."""
        if self.enabled:
            warnings.warn(
                f"frozen-prefix cache turned off: {reason}. Training goes on without it (the prefix is recomputed"
                " every step); FreezePolicy(cache_outputs=False) silences this",
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
        self._memory.clear()
        self._spilled.clear()
        self._mapped.clear()
        self._memory_bytes = 0
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
        self._files.clear()

    @contextlib.contextmanager
    def serving_probe(self) -> Iterator[None]:
        """Within it, a forward pass whose samples are all cached skips the prefix, in any mode (a probe pass).

        Nothing is stored or counted towards the training statistics; :attr:`probe_batches` counts the passes
        served. A cache that is turned off serves nothing.
        """
        self._probe = True
        try:
            yield
        finally:
            self._probe, self._mode, self._served = False, None, None

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
        return _same_outputs(forward(), short_cut)

    def _release_model(self) -> None:
        """Take the hooks and short cuts off the model (the cached outputs stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()

    def _adopt(self, below: PrefixCache | None, outermost: Sequence[str]) -> PrefixCache | None:
        """``below`` when its prefix is part of this one and its short cuts can be this one's; else closed."""
        if below is None:
            return None
        fits = (
            below.enabled
            and below.model is self.model
            and below.boundary != self.boundary
            and {*below.outermost, below.boundary} <= set(outermost)
        )
        if not fits:
            below.close()
            return None
        below._release_model()
        if below._below is not None:  # a cache two freezes down: this one's own filling needs only ``below``
            below._below.close()
            below._below = None
        return below

    # ------------------------------------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._boundary_done = False
        self._computed = None
        if self._replaying:
            return  # the replay's mode and outputs were set by the verification
        self._mode = None
        if self._probe:
            keys = sample_keys(args, kwargs) if self.enabled else None
            if keys and all(key in self for key in keys):
                self._mode, self._served = "hit", self._gather(keys)
                self.probe_batches += 1
            return
        if not (self.enabled and module.training and torch.is_grad_enabled()):
            return
        keys = sample_keys(args, kwargs)
        if keys is None:
            return
        self._keys = keys
        cached = [key in self for key in keys]
        hit_count = sum(cached)
        self._epoch_lookups += len(keys)
        self._epoch_hits += hit_count
        if hit_count < len(keys):
            self.misses += len(keys) - hit_count
            self._mode = "fill"
            if self._below is not None and all(key in self._below for key in keys):
                self._mode = "extend"
                self.extended_batches += 1
                self._served = self._below._gather(keys)
            return
        self.hits += len(keys)
        self._hit_batches += 1
        if self.verified < VERIFY_BATCHES or self._hit_batches % REVERIFY_EVERY == 0:
            self._mode = "verify"
            self._rng_before = _rng_state()
            return
        self._mode = "hit"
        self.skipped_batches += 1
        self._served = self._gather(keys)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._replaying:
            return
        mode, self._mode = self._mode, None
        if mode is None:
            return
        if not self._boundary_done:
            self.disable(f"the boundary layer {self.boundary!r} did not run in the model's forward")
            return
        if mode in ("fill", "extend"):
            self._store(self._keys, self._computed)
        if mode == "extend" and self._below is not None:
            self._below.forget(self._keys)  # moved up: the two caches together hold about one budget
        elif mode == "verify":
            self._verify(module, args, kwargs, output)
        self._served = self._computed = None

    def _prefix_forward(self, module: nn.Module, role: str | None) -> Callable[..., Any]:
        """A prefix module's forward: skipped on a hit, and on an "extend" batch below the old boundary.

        On an "extend" batch the modules below the old boundary (``role`` "skip") return their input and the old
        boundary (``role`` "below") returns the old cache's outputs.
        """
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self._boundary_done and self._mode is not None:
                if self._mode == "hit" or (self._mode == "extend" and role == "skip"):
                    return args[0] if args else next(iter(kwargs.values()), None)
                if self._mode == "extend" and role == "below":
                    return self._served
            return original(*args, **kwargs)

        return forward

    def _boundary_forward(self, module: nn.Module) -> Callable[..., Any]:
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._mode is None or self._boundary_done:
                return original(*args, **kwargs)
            self._boundary_done = True
            if self._mode == "hit":
                return self._served
            output = original(*args, **kwargs)
            if not isinstance(output, Tensor) or output.ndim == 0 or output.shape[0] != len(self._keys):
                self._mode = None
                self.disable(f"the boundary layer {self.boundary!r} does not return one tensor row per sample")
                return output
            self._computed = output.detach()
            return output

        return forward

    def _patch(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        module.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's method
        self._patched.append(module)

    # ------------------------------------------------------------------------------------------------------------
    # Verification
    # ------------------------------------------------------------------------------------------------------------

    def _verify(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Cached == recomputed at the boundary, and the short-cut forward gives the model's output."""
        assert self._computed is not None
        cached = self._gather(self._keys).to(self._computed.device)
        if cached.shape != self._computed.shape or not _close(cached, self._computed):
            self.disable(
                f"a cached output of {self.boundary!r} differs from the recomputed one (the prefix is not"
                " deterministic: dropout, random augmentation inside the model, or batch-dependent layers)"
            )
            return
        replayed, error = self._replay(module, args, kwargs, cached)
        if error is not None:
            self.disable(
                f"the forward pass fails when the prefix is skipped ({error}); the frozen layers are not a prefix"
            )
            return
        if not _same_outputs(output, replayed):
            self.disable(
                "the model's output changes when the prefix is skipped: something below the boundary layer"
                f" {self.boundary!r} reaches the layers above it (a skip connection?), so it is not a prefix"
            )
            return
        self.verified += 1

    def _replay(self, module: nn.Module, args: tuple, kwargs: dict, cached: Tensor) -> tuple[Any, str | None]:
        """The same forward through the short cut: same random state, buffers (running statistics) restored."""
        rng_after = _rng_state()
        # the replay updates copies of the buffers: the originals (saved for backward) must not change version
        originals = [(owner, dict(owner._buffers)) for owner in module.modules() if owner._buffers]
        for owner, buffers in originals:
            for name, buffer in buffers.items():
                if buffer is not None:
                    owner._buffers[name] = buffer.detach().clone()
        self._replaying, self._mode, self._served = True, "hit", cached
        try:
            _set_rng_state(self._rng_before)
            with torch.no_grad():
                return module(*args, **kwargs), None
        except Exception as error:  # noqa: BLE001 - any failure of the short cut means "not a prefix"
            return None, f"{type(error).__name__}: {error}"
        finally:
            self._replaying, self._mode = False, None
            _set_rng_state(rng_after)
            for owner, buffers in originals:
                owner._buffers.update(buffers)

    # ------------------------------------------------------------------------------------------------------------
    # Storage
    # ------------------------------------------------------------------------------------------------------------

    def _store(self, keys: list[bytes], outputs: Tensor | None) -> None:
        if outputs is None:
            return
        rows = outputs.to("cpu")
        spill = []
        for index, key in enumerate(keys):
            if key in self:
                continue
            row = rows[index].clone()
            size = row.numel() * row.element_size()
            if self.max_bytes is None or self._memory_bytes + size <= self.max_bytes:
                self._memory[key] = row
                self._memory_bytes += size
            else:
                spill.append((key, index))
        if spill:
            self._spill([key for key, _ in spill], rows[[index for _, index in spill]].clone())

    def _spill(self, keys: list[bytes], rows: Tensor) -> None:
        if self._spill_dir is None:
            self._spill_dir = self._spill_dir_factory()
            self._spill_dir.mkdir(parents=True, exist_ok=True)
        file_index = len(self._files)
        path = self._spill_dir / f"prefix_{file_index:06d}.pt"
        torch.save(rows, path)
        self._files.append(path)
        for row, key in enumerate(keys):
            self._spilled[key] = (file_index, row)

    def forget(self, keys: Sequence[bytes]) -> None:
        """Drop the outputs of ``keys`` (rows spilled to a file stay there until :meth:`close`)."""
        for key in keys:
            row = self._memory.pop(key, None)
            if row is not None:
                self._memory_bytes -= row.numel() * row.element_size()
            self._spilled.pop(key, None)

    def _gather(self, keys: list[bytes]) -> Tensor:
        rows = []
        for key in keys:
            row = self._memory.get(key)
            if row is None:
                file_index, index = self._spilled[key]
                if file_index not in self._mapped:
                    self._mapped[file_index] = torch.load(self._files[file_index], mmap=True, weights_only=True)
                row = self._mapped[file_index][index]
            rows.append(row)
        stacked = torch.stack(rows)
        device = _model_device(self.model)
        return stacked.to(device, non_blocking=True) if stacked.device != device else stacked


def sample_keys(args: tuple, kwargs: dict) -> list[bytes] | None:
    """One exact content key per sample of a forward call, or ``None`` when the call has no batch of tensors.

    A sample's key hashes (BLAKE2b, 128 bits) the bytes, dtype and shape of its row of every tensor argument whose
    first dimension is the batch size; the other arguments (scalars, options, tensors without a batch dimension)
    are hashed into every key.
    """
    leaves = list(args) + [kwargs[name] for name in sorted(kwargs)]
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor) and leaf.ndim > 0]
    if not tensors:
        return None
    size = int(tensors[0].shape[0])
    shared = hashlib.blake2b(digest_size=16)
    rows = []
    for position, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] == size:
            data = leaf.detach().to("cpu").contiguous()
            shared.update(f"{position}:{data.dtype}:{tuple(data.shape[1:])};".encode())
            rows.append(data.view(torch.uint8).reshape(size, -1).numpy() if data.numel() else None)
        elif isinstance(leaf, Tensor):
            data = leaf.detach().to("cpu").contiguous()
            shared.update(f"{position}:{data.dtype}:{tuple(data.shape)}:".encode())
            shared.update(data.view(torch.uint8).numpy().tobytes())
        else:
            shared.update(f"{position}:{leaf!r};".encode())
    prefix = shared.digest()
    keys = []
    for index in range(size):
        digest = hashlib.blake2b(prefix, digest_size=16)
        for row in rows:
            if row is not None:
                digest.update(row[index])
        keys.append(digest.digest())
    return keys


def _has_ancestor_in(name: str, names: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:end]) in names for end in range(1, len(parts)))


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _close(a: Tensor, b: Tensor) -> bool:
    if not a.is_floating_point():
        return torch.equal(a, b)
    precise = a.dtype in (torch.float32, torch.float64)
    scale = float(b.abs().max()) if b.numel() else 0.0
    rtol = 1e-4 if precise else 2e-2
    return torch.allclose(a, b, rtol=rtol, atol=rtol * max(scale, 1e-6))


def _same_outputs(a: Any, b: Any) -> bool:
    """Every tensor in two nested outputs (tensors, sequences, mappings) is close."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and _close(b.detach(), a.detach())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_outputs(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_outputs(a[key], b[key]) for key in a)
    return type(a) is type(b)


def _rng_state() -> list[Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return states


def _set_rng_state(states: list[Tensor] | None) -> None:
    if not states:
        return
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state_all(states[1:])
