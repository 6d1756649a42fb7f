"""Before the first measurement: the options checked against the model, the probe built, the capture set up.

The monitor runs these once, so that a bad layer name, a missing checkpoint or an unusable probe fails before
training starts: :func:`check_against_model` when the monitor is built, :func:`probe_from_config` and
:func:`capture_for` when it prepares its first probe pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_svcca.monitoring.budget import check_memory, planned_measurements
from lightning_svcca.monitoring.config import DEFAULT_PROBE_SIZE, MonitorConfig
from lightning_svcca.monitoring.cost import DATAPOINT_SCALING, estimate_costs, preflight_cost, probe_pass_seconds
from lightning_svcca.monitoring.runtime import Runtime
from lightning_svcca.monitoring.state import restart_comparisons
from lightning_svcca.pipeline.capture import Capture, CaptureOptions, SkipFn, WarnFn
from lightning_svcca.pipeline.heads import vocab_heads
from lightning_svcca.pipeline.layers import LayerSpec, default_layers
from lightning_svcca.pipeline.metrics import metrics_where, snapshot_needs
from lightning_svcca.pipeline.probe import Probe, build_probe, check_not_meta
from lightning_svcca.pipeline.references import ReferenceKind, check_reference_layers, device_of
from lightning_svcca.pipeline.snapshot import Collective, LocalCollective

if TYPE_CHECKING:
    from lightning_svcca.monitoring.monitor import SVCCAMonitor

__all__ = [
    "announce_left_out_heads",
    "capture_for",
    "check_against_model",
    "compute_dtype",
    "keep_measurable",
    "probe_from_config",
]


def check_against_model(config: MonitorConfig, specs: Sequence[LayerSpec]) -> None:
    """Layer names, module references and a freeze schedule must fit the model before anything runs."""
    names = [spec.name for spec in specs]
    for reference in config.references:
        if reference.kind is ReferenceKind.MODULE:
            check_reference_layers(reference, names)
        elif reference.kind is ReferenceKind.CHECKPOINT and not Path(reference.source).is_file():
            raise FileNotFoundError(f"reference {reference.name!r}: no checkpoint file at {reference.source}")
    policy = config.freeze
    if policy is not None:
        policy.rule.check_layers(names)


def announce_left_out_heads(model: nn.Module, config: MonitorConfig, log: Callable[..., None]) -> None:
    """One log line naming the vocabulary-sized heads the default layers leave out (:mod:`~.pipeline.heads`)."""
    if config.layers is not None:
        return
    heads = vocab_heads(model, default_layers(model, heads=True))
    if heads:
        log(
            "SVCCA leaves %s out of the default layers: a vocabulary-sized output head costs more to measure than"
            " every other layer together (name it in layers=... to measure it anyway)",
            ", ".join(f"{name!r} ({inputs} -> {outputs} features)" for name, (inputs, outputs) in heads.items()),
        )


def probe_from_config(config: MonitorConfig, warn_once: WarnFn) -> Probe:
    """The probe from ``config.probe`` (called first when it is a function), with a warning for a short loader."""
    source = config.probe() if callable(config.probe) and not isinstance(config.probe, nn.Module) else config.probe
    if source is None:
        raise ValueError("no probe: pass probe=<tensor, batch or DataLoader> (a few hundred samples or more)")
    check_not_meta(source)
    probe = build_probe(
        source,
        config.probe_size,
        input_key=config.probe_input,
        mask_key=config.probe_mask,
        seed=config.probe_seed,
    )
    if isinstance(source, DataLoader) and probe.size < config.probe_size != DEFAULT_PROBE_SIZE:  # asked for more
        warn_once(
            "probe-truncated",
            f"probe_size={config.probe_size} but the probe DataLoader holds only {probe.size} samples: the"
            f" probe is all {probe.size} of them. Pass probe_size=<n> (or more data) to silence this",
        )
    return probe


def probe_for(monitor: SVCCAMonitor, warn_once: WarnFn) -> Probe:
    """The monitor's probe; one that differs from the checkpoint's (its fingerprint) drops the snapshots."""
    if monitor.runtime.is_global_zero:
        announce_left_out_heads(monitor.model, monitor.config, monitor.runtime.logger.info)
    probe = probe_from_config(monitor.config, warn_once)
    fingerprint = probe.fingerprint()
    if monitor.probe_fingerprint is not None and fingerprint != monitor.probe_fingerprint:
        monitor.freezing.task.forget_probe()  # its loss curve is not comparable with the checkpoint's
        if monitor.store.keys():
            restart_comparisons(monitor, "the probe differs from the one in the checkpoint (other datapoints)")
    monitor.probe_fingerprint = fingerprint
    if probe.size < 2:
        raise ValueError(f"the probe has {probe.size} sample(s); it needs at least 2")
    return probe


def compute_dtype(config: MonitorConfig, model: nn.Module) -> torch.dtype:
    """The decomposition precision: ``compute_dtype``, with ``"auto"`` resolved for the model's device."""
    chosen = config.dtype
    if chosen is not None:
        return chosen
    on_gpu = device_of(model).type == "cuda"
    return torch.float32 if on_gpu and set(config.metrics) <= set(metrics_where("float32_safe")) else torch.float64


def capture_for(
    model: nn.Module,
    probe: Probe,
    specs: Sequence[LayerSpec],
    config: MonitorConfig,
    runtime: Runtime,
    *,
    skip: SkipFn,
    warn_once: WarnFn,
) -> Capture:
    """The run's probe passes and snapshots, checked with two probe samples through ``model``.

    The same two samples give each layer's width: a measurement that would need too much memory is warned about
    here (:func:`~lightning_svcca.monitoring.budget.check_memory`), what each measurement will cost is logged
    (:mod:`~lightning_svcca.monitoring.cost`), with a warning naming the layers that dominate, and a layer whose
    measurement cannot fit in the memory left is skipped (reported through ``skip``) and not recorded.
    """
    full_rank, with_right, with_affine = snapshot_needs(config.metrics)
    options = CaptureOptions(
        probe_batch_size=config.probe_batch_size,
        forward_fn=config.forward_fn,
        max_datapoints=config.max_datapoints,
        keep=config.keep,
        keep_by=config.keep_by,
        full_rank=full_rank,
        with_right=with_right,
        with_affine=with_affine,
        keep_means=bool(config.cross_layer_moments),
        dtype=compute_dtype(config, model),
    )
    capture = Capture(
        probe,
        list(specs),
        options,
        _probe_collective(probe, config, runtime.collective),
        skip=skip,
        warn_once=warn_once,
        forward_context=runtime.forward_context,
        convert_input=runtime.convert_input,
    )
    checked = capture.check(model, device_of(model))
    samples = min(2, probe.size)
    probe_seconds = probe_pass_seconds(
        lambda count: capture.record(model, device_of(model), limit=count),
        probe.size,
        options.probe_batch_size,
        device_of(model),
    )
    check_memory(checked, samples, probe.size, options.dtype, device_of(model), warn_once)
    compared = sum(reference.kind is not ReferenceKind.FINAL for reference in config.references) + config.baseline
    datapoint_metrics = {metric: compared for metric in config.metrics if metric in DATAPOINT_SCALING}
    costs = estimate_costs(
        checked, samples, probe.size, options.dtype, device_of(model), datapoint_metrics=datapoint_metrics
    )
    log = runtime.logger.info if runtime.is_global_zero else (lambda *args: None)
    too_large = preflight_cost(
        costs, probe_seconds, planned_measurements(config, runtime), device_of(model), log=log, warn_once=warn_once
    )
    for layer, why in too_large.items():  # left out before the first measurement: no allocator error later
        skip(0, layer, f"{why}; it is not measured in this run (lower probe_size or max_datapoints to measure it)")
    capture.specs = [spec for spec in capture.specs if spec.name not in too_large]
    return capture


def keep_measurable(monitor: SVCCAMonitor, capture: Capture) -> None:
    """The monitor's layers without those :func:`capture_for` left out (too large for the memory left)."""
    kept = {spec.name for spec in capture.specs}
    monitor.specs = [spec for spec in monitor.specs if spec.name in kept]
    monitor.snapshots.specs = list(monitor.specs)


def _probe_collective(probe: Probe, config: MonitorConfig, collective: Collective) -> Collective:
    """The full collective for a sharded probe, or this process alone (no sharding, or a tiny probe)."""
    if collective.world_size < 2 or not config.shard_probe or probe.size < 2 * collective.world_size:
        return LocalCollective()
    return collective
