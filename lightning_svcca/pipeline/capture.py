"""From model to snapshots: run the probe with hooks on the monitored layers and compress each layer's rows.

One :class:`Capture` serves a whole run. :meth:`Capture.record` runs this process's share of the probe through a
model (the trained one, or a fixed reference model) and returns the :class:`ActivationRecorder` holding the
reduced outputs; :meth:`Capture.snapshots` turns those rows into :class:`~lightning_svcca.pipeline.snapshot.Snapshot`
objects, skipping (with a warning, through ``skip``) any layer that did not run everywhere, is dead, or holds NaN.
Feature references (a tensor aligned with the probe's samples) are laid out like each layer's rows by
:meth:`Capture.feature_snapshots`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_svcca.measures import DATAPOINTS_PER_DIRECTION
from lightning_svcca.pipeline.distributed import buffers_from_rank_zero, shard
from lightning_svcca.pipeline.layers import LayerSpec
from lightning_svcca.pipeline.probe import ForwardFn, Probe, describe_batch, run_probe
from lightning_svcca.pipeline.probe_loss import ProbeLoss
from lightning_svcca.pipeline.recording import ActivationRecorder, LayoutWarning
from lightning_svcca.pipeline.reduction import Layout, OutputSelectionError, layer_seed, probe_share, reduce_output
from lightning_svcca.pipeline.snapshot import Collective, Snapshot, build_snapshot

__all__ = ["Capture", "CaptureOptions"]

#: What a user's forward pass raises when the probe is not what it takes (a tuple batch for a model taking a dict:
#: ``KeyError``, ``IndexError``, ``AttributeError``; a wrong shape or dtype: ``RuntimeError``, ``TypeError``).
FORWARD_ERRORS = (RuntimeError, TypeError, LookupError, AttributeError)
#: ``skip(epoch, layer, reason)``: record and warn about a layer left out of one measurement.
SkipFn = Callable[[int, str, str], None]
#: ``warn_once(key, message)``: a soft problem, warned about once per key.
WarnFn = Callable[[str, str], None]
#: A layer chosen by default is left out when its probe gives fewer datapoints than this per kept direction: its
#: similarities would sit near 1 whatever training does (a wide last stage on a small image probe).
LEAVE_OUT_BELOW = 2


@dataclass(frozen=True)
class CaptureOptions:
    """How the probe runs and how rows are compressed (the monitor's arguments of the same names)."""

    probe_batch_size: int = 256
    forward_fn: ForwardFn | None = None
    max_datapoints: int = 4096
    keep: float | int = 0.99
    keep_by: str = "singular_values"
    full_rank: bool = False
    with_right: bool = False
    #: Keep what centring removed (:attr:`Snapshot.affine`), which mutual_knn, cknna and rsa need.
    with_affine: bool = True
    dtype: torch.dtype = torch.float64
    #: Also keep each sample's output averaged over its positions (cross-layer maps).
    keep_means: bool = False


class Capture:
    """Probe passes and snapshots for one run: a fixed probe, fixed layer specs, fixed options.

    Args:
        probe: the probe batch.
        specs: the monitored layers.
        options: probe and snapshot options.
        collective: sums and gathers across processes for a sharded probe (``LocalCollective`` otherwise).
        skip: called for a layer left out of a measurement (default: nothing is reported).
        warn_once: called for soft problems (few datapoints; default: nothing is reported).
        forward_context: a context manager factory wrapped around each probe pass (e.g. a precision context).
        convert_input: applied to each probe chunk before the forward pass (e.g. a cast to the model's dtype).
    """

    def __init__(
        self,
        probe: Probe,
        specs: Sequence[LayerSpec],
        options: CaptureOptions,
        collective: Collective,
        *,
        skip: SkipFn | None = None,
        warn_once: WarnFn | None = None,
        forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        convert_input: Callable[[Any], Any] | None = None,
    ) -> None:
        self.probe = probe
        self.specs = list(specs)
        self.options = options
        self.collective = collective
        self._skip = skip or _report_nothing
        self._warn_once = warn_once or _report_nothing
        self._forward_context = forward_context
        self._convert_input = convert_input
        #: What passes of the monitored model showed of it (each layer's layout as first found, the strided layers
        #: that shorten a sequence): its later passes read the layers the same way, also when the modules this was
        #: learned from are skipped (a prefix served from the cache).
        self.layouts: dict[str, Layout] = {}
        self.strides: dict[int, tuple[int, nn.Module]] = {}
        #: Layers left out by :meth:`snapshots` with ``leave_out_thin``, and why.
        self.left_out: dict[str, str] = {}

    def record(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        label: str = "the model",
        skip: Collection[str] = (),
        monitored: bool = False,
        limit: int | None = None,
    ) -> ActivationRecorder:
        """Run this process's share of the probe through ``model`` on ``device`` with hooks on the layers.

        ``skip``: layers not to record (their outputs are known; they stay hooked for the forward order).
        ``monitored``: a pass of the monitored model, which reads its layers as its earlier passes did
        (:attr:`layouts`, :attr:`strides`) and adds what it shows, and keeps the probe's own loss
        (:attr:`ActivationRecorder.probe_loss`). ``limit``: the first ``limit`` probe samples only (on every
        process), instead of this process's share.
        A forward pass that fails inside torch (a probe of the wrong shape or dtype for the model, a reference
        model that does not take it) raises a ``ValueError`` naming the probe and ``label``.
        """
        probe = self.probe
        start, stop = shard(probe.size, self.collective) if limit is None else (0, min(limit, probe.size))
        mask_frames = None
        if probe.mask_key is not None:
            mask = probe.batch[probe.mask_key]
            mask_frames = int(mask.shape[1]) if mask.ndim == 2 else None
        layouts = self.layouts if monitored else {}
        specs = [
            replace(spec, layout=layouts[spec.name]) if spec.layout is None and spec.name in layouts else spec
            for spec in self.specs
        ]
        recorder = ActivationRecorder(
            model,
            specs,
            per_sample=probe_share(self.options.max_datapoints, probe.size),
            mask_frames=mask_frames,
            keep_means=self.options.keep_means,
            record_only=[spec.name for spec in specs if spec.name not in skip],
            strides=self.strides if monitored else None,
        )

        loss = ProbeLoss(probe) if monitored else None  # the freeze rule's task signal

        chunk_size = self.options.probe_batch_size

        def before_chunk(first: int, chunk: Any) -> None:
            size = min(first + chunk_size, stop) - first  # the chunk's samples, as Probe.chunks cut them
            recorder.start_chunk(first, probe.lengths(chunk), size, device)
            if loss is not None:
                loss.before_chunk(chunk, size)

        with buffers_from_rank_zero(model, self.collective), recorder:
            try:
                run_probe(
                    model,
                    probe,
                    chunk_size=chunk_size,
                    device=device,
                    forward_fn=self.options.forward_fn,
                    start=start,
                    stop=stop,
                    before_chunk=before_chunk,
                    forward_context=self._forward_context,
                    convert=self._convert_input,
                    on_output=None if loss is None else loss.add_output,
                )
            except OutputSelectionError:
                raise
            except FORWARD_ERRORS as error:
                raise self._forward_error(error, model, label) from error
        if loss is not None:
            recorder.probe_loss = loss.mean
        if monitored:
            for name, layout in recorder.layouts.items():
                self.layouts.setdefault(name, layout)
            self.strides.update(recorder.strides)
        return recorder

    def _forward_error(self, error: Exception, model: nn.Module, label: str) -> ValueError:
        """A forward pass that failed inside torch, told in terms of the probe and the model."""
        probe = self.probe
        if isinstance(probe.batch, Mapping) and probe.input_key is None and self.options.forward_fn is None:
            call = (
                f"a dict probe (keys {list(probe.batch)}) is called as model(**probe), whatever its number of keys;"
                " probe_input=<key> calls model(probe[key]) instead"
            )
        else:
            call = "a dict probe is called as model(**probe), or model(probe[key]) with probe_input=<key>"
        return ValueError(
            f"the probe's forward pass through {label} ({type(model).__name__}) failed: {error}. The probe"
            f" ({describe_batch(probe.inputs(probe.batch))}) must be what the model's forward takes, in a dtype it"
            f" computes in: check probe, probe_input and forward_fn ({call}); for a reference model, that it takes"
            " the trained model's inputs"
        )

    def check(self, model: nn.Module, device: torch.device) -> ActivationRecorder:
        """Record the first two probe samples through ``model``: a probe it cannot take fails here.

        Returns the recorder, whose rows give each layer's width and rows per sample (the memory estimate).
        Layout warnings wait for the first measurement.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LayoutWarning)
            return self.record(model, device, label="the model", limit=2)

    def outputs(self, model: nn.Module, device: torch.device, count: int) -> Any:
        """The model's output for the first ``count`` probe samples (one forward pass, no hooks, eval mode)."""
        outputs: list[Any] = []
        run_probe(
            model,
            self.probe,
            chunk_size=count,
            device=device,
            forward_fn=self.options.forward_fn,
            stop=min(count, self.probe.size),
            forward_context=self._forward_context,
            convert=self._convert_input,
            on_output=outputs.append,
        )
        return outputs[0]

    def snapshots(
        self,
        recorder: ActivationRecorder,
        layers: Sequence[str],
        epoch: int,
        device: torch.device,
        *,
        label: str,
        leave_out_thin: bool = False,
    ) -> dict[str, Snapshot]:
        """One snapshot per layer that ran on every sample of every process; a layer that fails is skipped.

        A layer that ran on part of the probe only (conditional computation) is skipped: its rows would be compared
        with rows of other samples as if paired. ``leave_out_thin`` (the first measurement of default layers): a
        layer with fewer than :data:`LEAVE_OUT_BELOW` datapoints per kept direction is left out, without the
        few-datapoints warning, and no longer hooked; :attr:`left_out` says why. When every layer is that thin, all
        are kept (and warned about).
        """
        unpaired = {layer: unpaired_rows(recorder, layer) for layer in layers if layer in recorder.activations}
        ran = [float(layer in recorder.activations and unpaired[layer] is None) for layer in layers]
        present = self.collective.sum(torch.tensor(ran, device=device))
        snapshots = {}
        for layer, count in zip(layers, present.tolist(), strict=True):
            if count < self.collective.world_size:
                why = unpaired.get(layer) or "it did not run in the probe"
                self._skip(epoch, layer, f"{why} ({label})")
                continue
            rows, eps = recorder.activations[layer], recorder.input_eps[layer]
            snapshot = self.build(rows, eps, layer, epoch, label, warn=not leave_out_thin)
            if snapshot is not None:
                snapshots[layer] = snapshot
        if leave_out_thin:
            thin = {
                layer: f"{snapshot.n_datapoints} datapoints for {snapshot.kept} kept directions"
                for layer, snapshot in snapshots.items()
                if snapshot.n_datapoints < LEAVE_OUT_BELOW * snapshot.kept
            }
            if len(thin) == len(snapshots):
                thin = {}
            self.left_out.update(thin)
            self.specs = [spec for spec in self.specs if spec.name not in thin]
            for layer, snapshot in snapshots.items():
                if layer not in thin:
                    self._warn_few_datapoints(layer, snapshot)
            snapshots = {layer: snapshot for layer, snapshot in snapshots.items() if layer not in thin}
        return snapshots

    def build(
        self, rows: Tensor, input_eps: float, layer: str, epoch: int, label: str, *, warn: bool = True
    ) -> Snapshot | None:
        """Compress one layer's rows; ``None`` (and a skip) when the rows cannot be decomposed.

        ``warn``: warn when the probe gives few datapoints for the directions kept.
        """
        try:
            snapshot = self.compress(rows, input_eps, layer)
        except ValueError as error:  # ZeroVarianceError (a dead layer) included: skip the layer, train on
            self._skip(epoch, layer, f"{error} ({label})")
            return None
        except RuntimeError as error:  # the allocator's: the layer is too large for the memory left, train on
            if not _out_of_memory(error):
                raise
            self._skip(
                epoch,
                layer,
                f"not enough memory to decompose its {tuple(rows.shape)} rows ({label}); lower probe_size or"
                " max_datapoints, or leave it out (layers=...)",
            )
            return None
        if warn:
            self._warn_few_datapoints(layer, snapshot)
        return snapshot

    def _warn_few_datapoints(self, layer: str, snapshot: Snapshot) -> None:
        recommended = DATAPOINTS_PER_DIRECTION * snapshot.kept
        if snapshot.n_datapoints < recommended:
            self._warn_once(
                f"few-datapoints:{layer}",
                f"layer {layer!r}: SVCCA keeps {snapshot.kept} directions but the probe gives {snapshot.n_datapoints}"
                f" datapoints; at least {recommended} are recommended ({DATAPOINTS_PER_DIRECTION} per direction),"
                " or similarities are biased towards 1. Raise probe_size (or max_datapoints for conv and sequence"
                " layers); the baseline tag shows the bias",
            )

    def compress(self, rows: Tensor, input_eps: float, layer: str) -> Snapshot:
        """One layer's rows as a snapshot, with the run's options.

        Raises:
            ValueError: the rows cannot be decomposed (``ZeroVarianceError`` for a dead layer, NaN).
        """
        options = self.options
        return build_snapshot(
            rows,
            self.collective,
            name=layer,
            keep=options.keep,
            keep_by=options.keep_by,
            full_rank=options.full_rank,
            with_right=options.with_right,
            input_eps=input_eps,
            dtype=options.dtype,
            with_affine=options.with_affine,
        )

    def feature_snapshots(
        self, name: str, features: Tensor, recorder: ActivationRecorder, layers: Sequence[str]
    ) -> dict[str, Snapshot]:
        """Snapshots of a feature reference (one row per probe sample, in probe order) laid out like each layer."""
        probe = self.probe
        if features.shape[0] != probe.size:
            raise ValueError(
                f"reference {name!r} has {features.shape[0]} rows but the probe has {probe.size} samples: a feature"
                " reference needs one row per probe sample, in probe order"
            )
        start, stop = shard(probe.size, self.collective)
        specs = {spec.name: spec for spec in self.specs}
        label = f"reference {name!r}"
        snapshots = {}
        for layer in layers:
            if layer not in recorder.sample_ids:
                continue
            sample_ids = recorder.sample_ids[layer]
            if features.ndim <= 2 or recorder.output_ndim.get(layer, 2) <= 2:
                rows = features.reshape(features.shape[0], -1).to(sample_ids.device)[sample_ids]
            else:
                lengths = None if probe.mask_key is None else probe.lengths(probe.batch)[start:stop]
                rows, _ = reduce_output(
                    features[start:stop].to(sample_ids.device),
                    layout=recorder.layouts[layer],
                    reduction=specs[layer].reduction,
                    sample_ids=torch.arange(start, stop, device=sample_ids.device),
                    per_sample=recorder.per_sample,
                    seed=layer_seed(layer),
                    lengths=lengths,
                    mask_frames=recorder.mask_frames,
                    length_map=recorder.frame_lengths,
                )
                if rows.shape[0] != sample_ids.shape[0]:
                    self._skip(
                        0,
                        layer,
                        f"{label} reduces to {rows.shape[0]} rows but the layer has {sample_ids.shape[0]}: its"
                        " positions or frames do not line up with the layer's",
                    )
                    continue
            eps = torch.finfo(rows.dtype).eps if rows.is_floating_point() else 0.0
            snapshot = self.build(rows.to(torch.float64), eps, layer, 0, label)
            if snapshot is not None:
                snapshots[layer] = snapshot
        return snapshots


def unpaired_rows(recorder: ActivationRecorder, layer: str) -> str | None:
    """Why ``layer``'s rows cannot be paired sample by sample with another pass's, or ``None`` when they can.

    Each row carries its probe sample (``recorder.sample_ids``); rows can be paired when the layer ran on every
    chunk of the probe (so on every sample) and its rows are in probe order.
    """
    recorded, run = recorder.chunks_recorded.get(layer, 0), recorder.chunks_run
    if recorded < run:
        return (
            f"it ran on {recorded} of the probe's {run} chunks only (conditional computation?), so its rows cover"
            " part of the probe and cannot be paired sample by sample with another measurement's"
        )
    ids = recorder.sample_ids[layer]
    if ids.numel() > 1 and bool((ids[1:] < ids[:-1]).any()):
        return "its rows are not in probe order, so they cannot be paired sample by sample"
    return None


def _out_of_memory(error: RuntimeError) -> bool:
    """Whether ``error`` is an allocation failure (CPU allocator, CUDA out of memory)."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def _report_nothing(*details: object) -> None:
    """The default ``skip`` and ``warn_once`` of a capture whose caller reports nothing (a one-off comparison)."""
