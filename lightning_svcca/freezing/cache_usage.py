"""Whether the prefix cache pays: what it served this epoch, whether inputs repeat, and whether serving is faster.

:class:`CacheUsage` keeps the counters a :class:`~lightning_svcca.freezing.prefix_cache.PrefixCache` reports
(:meth:`CacheUsage.served_share`) and judges two ways the cache can cost without serving:

* **Inputs that do not repeat** (random augmentation): in the first complete epoch after the one that filled the
  cache, once :data:`REPEAT_LOOKUPS` samples were looked up, fewer than :data:`REPEAT_SHARE` of them were found
  (one process sees every sample each epoch). A random flip with ``p=0.5`` finds half of its samples and never a
  whole batch. Under a distributed sampler, which deals each process another share each epoch, only fewer than
  :data:`MIN_REPEAT_SHARE` found counts (no input repeats at all).
* **Serving that is not faster** (a step bound by kernel launches, where hashing the inputs costs more than the
  prefix): once the cache serves, every :data:`BASELINE_EVERY`-th batch runs as if the cache were off (no keys, no
  lookup), and the wall time from each batch's start to the next one's is kept by what the batch did. With
  :data:`TIMED_STEPS` full steps and twice as many served ones, the cache turns off unless the median served step
  is at least :data:`MIN_GAIN` faster than the median full step (a verdict on this prefix: the freezer gives a
  longer one a new cache). Whole steps are timed, so the hashing, the copies
  and the synchronisations they cause count, on a GPU as on the CPU.
"""

from __future__ import annotations

import enum
import statistics
import time
from dataclasses import dataclass

import torch.distributed as dist

__all__ = [
    "BASELINE_EVERY",
    "MIN_GAIN",
    "REPEAT_LOOKUPS",
    "REPEAT_SHARE",
    "TIMED_STEPS",
    "CacheUsage",
    "Step",
    "Verdict",
]

#: Samples looked up in the epoch after the fill before the repeat share is judged.
REPEAT_LOOKUPS = 256
#: Below this fraction of the expected share of repeated samples, inputs are taken not to repeat.
REPEAT_SHARE = 0.8
#: Under a distributed sampler (each process gets another share of the data each epoch), the least share found.
MIN_REPEAT_SHARE = 0.01
#: While timing, one batch in this many runs in full without the cache (the baseline).
BASELINE_EVERY = 3
#: Full (baseline) steps timed before deciding; served steps: twice as many.
TIMED_STEPS = 5
#: A served step must be at least this much faster than a full one for the cache to stay on.
MIN_GAIN = 0.02


class Step(enum.Enum):
    """What a training batch did with the cache, for timing."""

    #: Not timed: filled, extended, verified, or no training forward pass.
    OTHER = "other"
    #: Served from the cache.
    SERVED = "served"
    #: Ran in full without the cache (a baseline batch).
    FULL = "full"


@dataclass(frozen=True)
class Verdict:
    """A judgement of the cache: turn it off (warning or not), or it pays; ``message`` says why."""

    off: bool
    message: str
    warn: bool = True


class CacheUsage:
    """Counters of one cache by epoch, the repeat judgement and the timing of served against full steps.

    Args:
        built_in_epoch: the epoch of the last batch before the cache was built: when the next batch is in it too,
            the cache was built mid-epoch and that epoch does not count as the fill.
    """

    def __init__(self, built_in_epoch: int | None = None) -> None:
        #: The epoch in progress; its training batches, those served, its samples looked up and those found.
        self.epoch: int | None = None
        self.batches = 0
        self.served = 0
        self.lookups = 0
        self.hits = 0
        #: Complete epochs seen before this one (the first complete one fills the cache; -1 while a partial one).
        self.epochs = 0
        #: ``None`` while timing; then whether serving was found faster.
        self.faster: bool | None = None
        #: Seconds from a batch's start to the next one's, by what the batch did.
        self.timings: dict[Step, list[float]] = {Step.SERVED: [], Step.FULL: []}
        self._built_in_epoch = built_in_epoch
        self._step = Step.OTHER
        self._started: float | None = None
        self._timed_batches = 0
        self._repeats_judged = False

    def start_batch(self, epoch: int) -> Verdict | None:
        """Count a new batch and time the previous one; a :class:`Verdict` once the cache is judged."""
        now = time.perf_counter()
        if epoch == self.epoch and self._started is not None and self._step in self.timings:
            self.timings[self._step].append(now - self._started)
        self._started, self._step = now, Step.OTHER
        if epoch != self.epoch:
            no_repeats = None
            if self.epoch is None:
                self.epochs = -1 if epoch == self._built_in_epoch else 0
            else:
                no_repeats = self._no_repeat_reason(epoch_over=True)
                self.epochs += 1
            self.epoch, self.batches, self.served, self.lookups, self.hits = epoch, 0, 0, 0, 0
            if no_repeats is not None:
                return Verdict(True, no_repeats)
        self.batches += 1
        return self._judge_speed()

    def lookup(self, samples: int, found: int) -> str | None:
        """Count a training batch's lookups; why inputs do not repeat, when this shows it."""
        self.lookups += samples
        self.hits += found
        return self._no_repeat_reason()

    def mark_served(self, first: bool) -> None:
        """A training forward pass was served (``first``: the batch's first one, which counts and is timed)."""
        if first:
            self.served += 1
            self._step = Step.SERVED

    def runs_baseline(self) -> bool:
        """Whether this batch runs in full without the cache, to time it (one in :data:`BASELINE_EVERY`)."""
        if self.faster is not None:
            return False
        self._timed_batches += 1
        if self._timed_batches % BASELINE_EVERY:
            return False
        self._step = Step.FULL
        return True

    def served_share(self) -> float:
        """Share of this epoch's training batches whose prefix was served."""
        return self.served / self.batches if self.batches else 0.0

    def timing_summary(self) -> str:
        """The median served and full step times, and how many of each were timed."""
        full, served = self.timings[Step.FULL], self.timings[Step.SERVED]
        if not full or not served:
            return "no steps timed"
        return (
            f"median step {statistics.median(served) * 1e3:.2f} ms served, {statistics.median(full) * 1e3:.2f} ms"
            f" in full, over {len(served)} and {len(full)} steps"
        )

    def _no_repeat_reason(self, epoch_over: bool = False) -> str | None:
        """Why inputs do not repeat, judged once in the first complete epoch after the fill; else ``None``.

        Judged once :data:`REPEAT_LOOKUPS` samples were looked up, or at the end of the epoch (``epoch_over``).
        """
        if self._repeats_judged or self.epochs != 1 or not (self.lookups >= REPEAT_LOOKUPS or epoch_over):
            return None
        self._repeats_judged = True
        # one process sees every sample each epoch; a distributed sampler deals each process another share
        expected = 1.0 if _world_size() == 1 else MIN_REPEAT_SHARE / REPEAT_SHARE
        if not self.lookups or self.hits >= REPEAT_SHARE * expected * self.lookups:
            return None
        return (
            f"training inputs do not repeat exactly: {self.hits} of the first {self.lookups} samples of the epoch"
            f" after the fill were seen before (expected at least {REPEAT_SHARE * expected:.0%}), so whole batches"
            " are never cached: random augmentation upstream (crops, flips, noise), or data that changes every epoch"
        )

    def _judge_speed(self) -> Verdict | None:
        """Once enough steps are timed: off when serving is not :data:`MIN_GAIN` faster, else that it pays."""
        full, served = self.timings[Step.FULL], self.timings[Step.SERVED]
        if self.faster is not None or len(full) < TIMED_STEPS or len(served) < 2 * TIMED_STEPS:
            return None
        self.faster = statistics.median(served) <= (1.0 - MIN_GAIN) * statistics.median(full)
        if self.faster:
            return Verdict(False, self.timing_summary())
        return Verdict(
            True,
            f"a served step is not {MIN_GAIN:.0%} faster than a full one ({self.timing_summary()}): the prefix costs"
            " less than looking its outputs up (a longer frozen prefix gets a new cache)",
            warn=False,
        )


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
