"""What a measurement will cost, said before the first one is paid: time and memory per layer from the shapes.

The preflight's two-sample probe pass gives each layer's width and datapoints per sample, so each layer's
measurement is known before it runs: its rows (``datapoints x width``), the decomposition's work arrays
(:func:`~lightning_svcca.monitoring.budget.layer_memory`) and its floating-point operations
(:func:`decomposition_flops`), turned into seconds by this machine's measured matrix-product rate
(:func:`flop_rate`) and a measured :data:`OVERHEAD`, plus the probe pass (:func:`probe_pass_seconds`: two warm timed
passes split into a cost per chunk and a cost per sample, scaled to the probe's chunks and samples).
:func:`preflight_cost` logs one line with the estimate, warns once naming the layers that dominate when the
measurements planned would take :data:`~lightning_svcca.monitoring.budget.COST_MIN_SECONDS` or more, and returns the
layers whose measurement cannot fit in the memory this process can still allocate (:func:`available_memory`):
those are left out with a clear message, instead of failing in the allocator at the first measurement.
"""

from __future__ import annotations

import functools
import math
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_svcca.monitoring import budget
from lightning_svcca.pipeline.recording import ActivationRecorder

__all__ = [
    "LayerCost",
    "available_memory",
    "datapoint_metric_seconds",
    "decomposition_flops",
    "estimate_costs",
    "flop_rate",
    "preflight_cost",
    "probe_pass_seconds",
]

#: A layer is named as expensive when it takes at least this share of a measurement ...
EXPENSIVE_SHARE = 0.25
#: ... and at least this many times the median layer's time.
EXPENSIVE_OVER_MEDIAN = 4.0
#: Seconds of a snapshot over its operations at the matrix-product rate: centring and dtype conversions, the blocked
#: Gram product and the rank cut run below it (measured on a CPU, float64, 1,024 x 5,000, 2,048 x 5,000 and
#: 4,096 x 1,024 rows: 1.2 to 1.7).
OVERHEAD = 1.5
#: Samples of the larger of the two timed passes of :func:`probe_pass_seconds` (fewer when a chunk holds fewer).
TIMED_SAMPLES = 32
_GIB = 2**30


@dataclass(frozen=True)
class LayerCost:
    """One layer's measurement: rows held (bytes), decomposition work arrays (bytes), estimated seconds."""

    datapoints: int
    width: int
    rows: int
    work: int
    seconds: float

    @property
    def bytes(self) -> int:
        """Rows and work arrays together: what the layer needs at its peak."""
        return self.rows + self.work


def decomposition_flops(datapoints: int, width: int) -> float:
    """Floating-point operations of one layer's snapshot: Gram or kernel product, eigendecomposition, basis.

    With ``m = min(datapoints, width)``: the centred ``m x m`` product (``2 n d m``), its eigendecomposition (about
    ``9 m^3`` at the matrix-product rate, measured) and the basis projected back (``2 n d m``).
    """
    smaller = min(datapoints, width)
    return 4.0 * datapoints * width * smaller + 9.0 * float(smaller) ** 3


@functools.lru_cache(maxsize=8)
def flop_rate(dtype: torch.dtype, device: torch.device) -> float:
    """Floating-point operations per second of a matrix product in ``dtype`` on ``device`` (measured once, ~20 ms).

    The fastest of a few products: what the machine does when the measurement has it to itself.
    """
    size = 384
    # no random numbers: the global generator belongs to the training loop
    matrix = torch.linspace(-1.0, 1.0, size * size, dtype=dtype, device=device).reshape(size, size)
    (matrix @ matrix).sum().item()  # warm up
    fastest = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        (matrix @ matrix).sum().item()
        fastest = min(fastest, time.perf_counter() - started)
    return 2.0 * size**3 / max(fastest, 1e-6)


def estimate_costs(
    recorder: ActivationRecorder,
    samples: int,
    probe_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    datapoint_metrics: Mapping[str, int] | None = None,
) -> dict[str, LayerCost]:
    """Each layer's :class:`LayerCost` from a pass of ``samples`` probe samples.

    ``datapoint_metrics``: the measures computed from the datapoints (:data:`DATAPOINT_SCALING`) and how many
    comparisons of each a measurement makes; their seconds grow with the datapoints, not with the width alone.
    """
    compute_bytes = torch.finfo(dtype).bits // 8
    rate = flop_rate(dtype, device)
    costs = {}
    for layer, rows in recorder.activations.items():
        datapoints = round(rows.shape[0] / max(1, samples) * probe_size)
        width = int(rows[0].numel()) if rows.ndim > 1 else 1
        held, work = budget.layer_memory(datapoints, width, rows.element_size(), compute_bytes)
        seconds = OVERHEAD * decomposition_flops(datapoints, width) / rate
        for metric, comparisons in (datapoint_metrics or {}).items():
            seconds += comparisons * datapoint_metric_seconds(metric, datapoints, min(width, datapoints))
        costs[layer] = LayerCost(datapoints, width, held, work, seconds)
    return costs


#: How the measures computed from the datapoints grow with them: exponent ``p`` of ``n ** p``, and whether a sort
#: of the ``n ** 2`` pairs adds a ``log n`` (RSA ranks the dissimilarities). Neighbour sets and RBF kernels take
#: ``n x n`` matrices; minibatch CKA takes chunks of a fixed size.
DATAPOINT_SCALING = {
    "mutual_knn": (2, False),
    "cknna": (2, False),
    "rsa": (2, True),
    "minibatch_cka": (1, False),
    "rbf_cka": (2, False),
}
#: Datapoints of the one timed call that :func:`datapoint_metric_seconds` scales from.
TIMED_DATAPOINTS = 256


def datapoint_metric_seconds(metric: str, datapoints: int, width: int) -> float:
    """Seconds of one comparison by ``metric`` of ``datapoints`` rows of ``width`` features: timed once, scaled.

    A flop count would miss what these measures spend in top-k selection and sorting, so one call on
    :data:`TIMED_DATAPOINTS` rows is timed and scaled by :data:`DATAPOINT_SCALING`: a few times off at most, where
    leaving them out read 1,000 times low (RSA on a conv layer's 8,192 datapoints).
    """
    power, sorts = DATAPOINT_SCALING[metric]
    ratio = max(1.0, datapoints / TIMED_DATAPOINTS)
    scale = ratio**power * (math.log(max(datapoints, 2)) / math.log(TIMED_DATAPOINTS) if sorts else 1.0)
    return _timed_metric(metric, max(1, min(width, TIMED_DATAPOINTS))) * scale


@functools.lru_cache(maxsize=64)
def _timed_metric(metric: str, width: int) -> float:
    """Seconds of one call of ``metric`` on :data:`TIMED_DATAPOINTS` random rows (after a warm-up call)."""
    from lightning_svcca import measures  # the public measures: the same kernels the snapshots' comparisons run

    function = getattr(measures, metric)
    generator = torch.Generator().manual_seed(0)  # not the global generator: it belongs to the training loop
    x, y = (torch.randn(TIMED_DATAPOINTS, width, generator=generator, dtype=torch.float64) for _ in range(2))
    function(x, y)
    started = time.perf_counter()
    function(x, y)
    return time.perf_counter() - started


def probe_pass_seconds(
    record: Callable[[int], object], probe_size: int, chunk_size: int, device: torch.device
) -> float:
    """Seconds of a whole probe pass, from two timed passes of its first samples (``record(samples)`` runs one).

    A pass costs a part per forward call (Python, hooks, kernel launches), which dominates a small model, and a part
    per sample. Passes of 2 and of up to :data:`TIMED_SAMPLES` samples, after the check pass paid the one-time
    costs, give both; the probe then pays the first once per chunk of ``chunk_size`` and the second per sample.
    Scaling the check pass alone by ``probe_size / 2`` read 10-1000x too high on small models.
    """
    small = min(2, probe_size)
    large = min(probe_size, chunk_size, TIMED_SAMPLES)
    small_seconds = _timed_pass(record, small, device)
    if large <= small:
        per_call, per_sample = small_seconds, 0.0
    else:
        per_sample = max(0.0, (_timed_pass(record, large, device) - small_seconds) / (large - small))
        per_call = max(0.0, small_seconds - small * per_sample)
    return math.ceil(probe_size / chunk_size) * per_call + probe_size * per_sample


def _timed_pass(record: Callable[[int], object], samples: int, device: torch.device) -> float:
    started = time.perf_counter()
    record(samples)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on ``device`` (``None``: unknown).

    The GPU's free memory; on the CPU the least of the system's available memory, the control group's limit less
    its usage, and the address-space limit (``ulimit -v``) less what the process maps.
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    candidates = [_meminfo("MemAvailable"), _cgroup_room()]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = _status("VmSize")
        candidates.append(soft - (mapped or 0))
    known = [value for value in candidates if value is not None]
    return max(0, min(known)) if known else None


def preflight_cost(
    costs: Mapping[str, LayerCost],
    probe_seconds: float,
    planned: int | None,
    device: torch.device,
    *,
    log: Callable[..., None],
    warn_once: Callable[[str, str], None],
) -> dict[str, str]:
    """Say what measuring will cost; warn about expensive layers; the layers that cannot fit, with why.

    Args:
        costs: :func:`estimate_costs`.
        probe_seconds: the probe pass's estimated seconds (:func:`probe_pass_seconds`).
        planned: measurements in the whole fit (``None``: unknown; one is assumed).
        device: where the decomposition runs (whose free memory bounds a layer).
        log: an info logger (one line).
        warn_once: the monitor's once-per-key warning.
    """
    if not costs:
        return {}
    seconds = probe_seconds + sum(cost.seconds for cost in costs.values())
    peak = budget.peak({layer: (cost.rows, cost.work) for layer, cost in costs.items()})
    ranked = sorted(costs, key=lambda layer: -costs[layer].seconds)
    log(
        "SVCCA estimates each measurement at about %s and %s (probe pass %s); the costliest layers: %s",
        _seconds(seconds),
        _size(peak),
        _seconds(probe_seconds),
        ", ".join(_describe(layer, costs[layer], seconds) for layer in ranked[:3]),
    )
    median = statistics.median(cost.seconds for cost in costs.values())
    expensive = [
        layer
        for layer in ranked
        if costs[layer].seconds >= EXPENSIVE_SHARE * seconds and costs[layer].seconds >= EXPENSIVE_OVER_MEDIAN * median
    ]
    count = planned or 1
    if expensive and seconds * count >= budget.COST_MIN_SECONDS:
        warn_once(
            "cost-estimate",
            f"measuring will cost about {_seconds(seconds)} and {_size(peak)} per measurement, about"
            f" {_seconds(seconds * count)} over {count} measurement{'s' if count != 1 else ''}, mostly for"
            f" {', '.join(_describe(layer, costs[layer], seconds) for layer in expensive)} (estimated from the"
            " shapes). Leave them out (layers=...), or lower probe_size or max_datapoints",
        )
    room = available_memory(device)
    if room is None:
        return {}
    return {
        layer: f"its measurement needs about {_size(cost.bytes)} ({cost.datapoints} datapoints x {cost.width}"
        f" features), more than the {_size(room)} of {device.type} memory this process can still allocate"
        for layer, cost in costs.items()
        if cost.bytes > room
    }


def _describe(layer: str, cost: LayerCost, total: float) -> str:
    share = cost.seconds / total if total > 0 else 0.0
    return f"{layer!r} {_seconds(cost.seconds)} ({share:.0%}), {_size(cost.bytes)}"


def _seconds(seconds: float) -> str:
    return f"{seconds:.2g} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _size(size: int) -> str:
    return f"{size / _GIB:.1f} GiB" if size >= _GIB // 4 else f"{size / 2**20:.0f} MiB"


def _meminfo(key: str) -> int | None:
    return _field(Path("/proc/meminfo"), key)


def _status(key: str) -> int | None:
    return _field(Path("/proc/self/status"), key)


def _field(path: Path, key: str) -> int | None:
    """A ``Key:   123 kB`` line of a /proc file, in bytes."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """The control group's memory limit less its usage (cgroup v2, then v1), or ``None`` without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return int(limit) - usage
        return None
    return None
