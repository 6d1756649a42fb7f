"""What measuring costs: memory per layer before the first measurement, time against the fit after a few.

:func:`check_memory` estimates, from a two-sample probe pass, the memory each layer's measurement needs (its rows
for the whole probe, and the decomposition's work arrays) and warns when the whole would exceed
:data:`MEMORY_SHARE` of the machine's memory (the GPU's when the model is on one). :class:`CostWatch` compares
each measurement's time with the training time since the one before and warns once when measuring takes more than
:data:`COST_SHARE` of the fit (and at least :data:`COST_MIN_SECONDS` over the planned measurements, so short runs
stay quiet), and sums the run's measuring up in one line at its end. The warnings and the line name the knobs to
turn.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import torch

from lightning_svcca.monitoring.config import MonitorConfig
from lightning_svcca.monitoring.runtime import Runtime
from lightning_svcca.pipeline.recording import ActivationRecorder

__all__ = [
    "COST_MIN_SECONDS",
    "COST_SHARE",
    "SUMMARY_ADVICE_SHARE",
    "MEMORY_SHARE",
    "CostWatch",
    "check_memory",
    "layer_memory",
    "machine_memory",
    "peak",
]

#: Warn when a measurement would need more than this share of the machine's (or the GPU's) memory.
MEMORY_SHARE = 0.25
#: Warn when measuring takes more than this share of the fit's time ...
COST_SHARE = 0.25
#: ... and the planned measurements add up to at least this many seconds.
COST_MIN_SECONDS = 30.0
#: The end-of-fit cost line says how to spend less when measuring took more than this share of the fit.
SUMMARY_ADVICE_SHARE = 0.03
_GIB = 2**30


def layer_memory(datapoints: int, width: int, storage_bytes: int, compute_bytes: int) -> tuple[int, int]:
    """Bytes one layer's measurement holds: ``(rows, decomposition)``.

    Rows: ``datapoints x width`` in their storage dtype, kept for every layer until all are snapshotted. The
    decomposition (one layer at a time): with fewer datapoints than features, the rows in the compute dtype and a
    thin SVD's right vectors as large again, plus its ``datapoints^2`` left vectors; otherwise the ``width^2``
    Gram matrix and its eigenvectors. A 1,000,000-wide layer of 1,024 datapoints (float32 rows, float64
    decomposition) needs about 19 GiB.
    """
    rows = datapoints * width * storage_bytes
    if datapoints < width:
        work = (2 * datapoints * width + datapoints**2) * compute_bytes
    else:
        work = 2 * width**2 * compute_bytes
    return rows, work


def machine_memory(device: torch.device) -> int | None:
    """Total memory of ``device``: the GPU's, or this machine's RAM (``None`` when the system does not say)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(
    recorder: ActivationRecorder,
    samples: int,
    probe_size: int,
    compute_dtype: torch.dtype,
    device: torch.device,
    warn_once: Callable[[str, str], None],
) -> dict[str, tuple[int, int]]:
    """Estimate each layer's memory from a pass of ``samples`` probe samples; warn when the whole is too much.

    The whole: every layer's rows (held together) plus the largest decomposition. Returns the estimates.
    """
    compute_bytes = torch.finfo(compute_dtype).bits // 8
    estimates = {
        layer: layer_memory(
            datapoints=round(rows.shape[0] / max(1, samples) * probe_size),
            width=int(rows[0].numel()) if rows.ndim > 1 else 1,
            storage_bytes=rows.element_size(),
            compute_bytes=compute_bytes,
        )
        for layer, rows in recorder.activations.items()
    }
    total, available = peak(estimates), machine_memory(device)
    if available and total > MEMORY_SHARE * available:
        largest = sorted(estimates, key=lambda layer: -sum(estimates[layer]))[:3]
        shown = ", ".join(f"{layer!r} {sum(estimates[layer]) / _GIB:.1f} GiB" for layer in largest)
        warn_once(
            "memory",
            f"measuring needs about {total / _GIB:.1f} GiB ({shown}), more than {MEMORY_SHARE:.0%} of the"
            f" {available / _GIB:.0f} GiB of {device.type} memory. Lower probe_size (now {probe_size}) or"
            " max_datapoints (datapoints per layer), or leave the widest layers out (layers=...)",
        )
    return estimates


def peak(estimates: Mapping[str, tuple[int, int]]) -> int:
    """Every layer's rows (held together) plus the largest decomposition (one at a time)."""
    return sum(rows for rows, _ in estimates.values()) + max((work for _, work in estimates.values()), default=0)


class CostWatch:
    """Counts what measuring costs: warns once when it takes more than :data:`COST_SHARE` of the fit, sums it up.

    The fit's time between two measurements is what passed since the last one ended; a measurement of ``m``
    seconds after ``t`` seconds of training takes ``m / (m + t)`` of the fit. :meth:`summary` gives the whole
    run's share (the probe's set-up and the end-of-fit comparisons included: on a small fit they are a good part of
    it), with the part spent in the probe's forward passes, for the line the monitor logs at the end.

    Args:
        warn_once: the monitor's once-per-key warning.
    """

    def __init__(self, warn_once: Callable[[str, str], None]) -> None:
        self._warn_once = warn_once
        self._last_end: float | None = None
        self._started: float | None = None
        self._prepared: tuple[float, float] | None = None
        self.seconds = 0.0
        self.probe_seconds = 0.0
        #: Seconds outside the measurements: the probe's set-up, the end-of-fit comparisons with the final model.
        self.other_seconds = 0.0
        self.count = 0

    def prepared(self, began: float, seconds: float) -> None:
        """The probe was built and checked from ``began`` (a ``perf_counter`` time), in ``seconds``: the fit's start."""
        self._prepared = (began, seconds)

    def start(self) -> None:
        """The fit starts (or resumes) now, or when its probe was set up: :meth:`summary` measures from there."""
        began, setting_up = self._prepared or (time.perf_counter(), 0.0)
        self._prepared = None
        self._started = began
        self.seconds = self.other_seconds = setting_up
        self.probe_seconds = 0.0
        self.count = 0

    def measured(self, seconds: float, planned: int | None, done: int, probe_seconds: float = 0.0) -> None:
        """Count a measurement of ``seconds``, ``probe_seconds`` of it the probe's forward pass.

        ``planned``: measurements in the whole fit (``None``: unknown); ``done``: measurements so far.
        """
        now = time.perf_counter()
        self.seconds += seconds
        self.probe_seconds += probe_seconds
        self.count += 1
        if self._last_end is not None:
            training = max(0.0, now - seconds - self._last_end)
            share = seconds / max(seconds + training, 1e-9)
            total = seconds * (planned or done)
            if share > COST_SHARE and total >= COST_MIN_SECONDS:
                self._warn_once(
                    "cost",
                    f"measuring takes {share:.0%} of the fit ({seconds:.2f} s per measurement, {training:.2f} s of"
                    f" training between two), about {total / 60:.1f} min over {planned or done}"
                    f" measurement{'s' if (planned or done) != 1 else ''}."
                    " Measure less often (every_n_epochs, every_n_train_steps) or make each one cheaper (a smaller"
                    " probe_size or max_datapoints, fewer layers)",
                )
        self._last_end = now

    def spent(self, seconds: float) -> None:
        """Count measuring work outside a measurement (the end-of-fit comparisons with the final model)."""
        self.seconds += seconds
        self.other_seconds += seconds

    def summary(self) -> str | None:
        """What measuring took of the fit since :meth:`start`, in one line (``None`` before any measurement)."""
        if self._started is None or not self.count:
            return None
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        share = self.seconds / elapsed
        measuring = self.seconds - self.other_seconds
        line = (
            f"measuring took {self.seconds:.1f} s of the {elapsed:.1f} s since the fit started ({share:.1%}):"
            f" {self.count} measurement{'s' if self.count != 1 else ''} of {measuring / self.count:.2f} s"
            f" ({self.probe_seconds / max(measuring, 1e-9):.0%} of {'them' if self.count != 1 else 'it'} the probe's"
            f" forward passes), and {self.other_seconds:.1f} s setting up the probe and comparing with the final model"
        )
        if share > SUMMARY_ADVICE_SHARE:
            line += (
                ". To spend less, measure less often (every_n_epochs, every_n_train_steps) or use a smaller probe"
                " (probe_size): the forward pass costs in proportion to it"
            )
        return line


def run_length(config: MonitorConfig, runtime: Runtime) -> int | None:
    """The run's planned length in points (steps when measuring by steps, else epochs), if the framework knows it."""
    return runtime.max_steps if config.every_n_train_steps is not None else runtime.max_epochs


def planned_measurements(config: MonitorConfig, runtime: Runtime) -> int | None:
    """Measurements in the whole run, if the framework knows its length."""
    length = run_length(config, runtime)
    every = config.every_n_train_steps if config.every_n_train_steps is not None else config.every_n_epochs
    return length // every if length and every else None
