"""Pieces of ``freeze_benchmark.py`` that are not workloads: AutoFreeze's rule and the untimed per-epoch test.

:class:`AutoFreeze` is the comparison policy: the rule of Liu et al. 2021 ("AutoFreeze: Automatically Freezing
Model Blocks to Accelerate Fine-tuning"). Over each interval (here one epoch) it sums, per layer, the L2 norm of
the layer's gradient at every step; at the interval's end each unfrozen layer's *gradient-norm change rate* is
``|G(t) - G(t-1)| / G(t-1)``, and the layers whose rate is below the 50th percentile of the unfrozen layers' rates
are frozen, bottom-up as a prefix (a layer freezes only when every layer below it is frozen). The top layer is
never frozen. Freezing is ``requires_grad=False``, gradients dropped, BatchNorm in eval mode.

:class:`EpochClock` evaluates the test set at each epoch end and takes that time out of the fit's clock, so the
time-to-accuracy curve (the time at which a run first reaches an accuracy) counts training only.
"""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class AutoFreeze(pl.Callback):
    """AutoFreeze's gradient-norm rule (see the module docstring).

    Args:
        layers: monitored layers bottom-up; a layer's parameters are those whose names start with ``layer + "."``.
        percentile: rates below this percentile of the unfrozen layers' rates count as converged.
    """

    def __init__(self, layers: list[str], percentile: float = 50.0) -> None:
        self.layers, self.percentile = list(layers), percentile
        self.frozen: dict[str, int] = {}
        self._sums: dict[str, float] = {}
        self._previous: dict[str, float] = {}

    def _parameters(self, module: nn.Module, layer: str) -> list[nn.Parameter]:
        return [p for name, p in module.named_parameters() if name.startswith(layer + ".") and p.requires_grad]

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in self.layers:
            if layer in self.frozen:
                continue
            grads = [p.grad.detach() for p in self._parameters(pl_module, layer) if p.grad is not None]
            if grads:
                norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
                self._sums[layer] = self._sums.get(layer, 0.0) + norm

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        for layer in self.frozen:
            for name, module in pl_module.named_modules():
                if name.startswith(layer + ".") and isinstance(module, _BatchNorm):
                    module.eval()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rates = {
            layer: abs(self._previous[layer] - total) / self._previous[layer]
            for layer, total in self._sums.items()
            if self._previous.get(layer)
        }
        self._previous, self._sums = self._sums, {}
        if len(rates) < 2:
            return
        cut = float(torch.quantile(torch.tensor(list(rates.values())), self.percentile / 100.0))
        for layer in self.layers[:-1]:
            if layer in self.frozen:
                continue
            if rates.get(layer, cut) >= cut:
                break
            self.freeze(pl_module, layer, trainer.current_epoch + 1)

    def freeze(self, module: nn.Module, layer: str, epoch: int) -> None:
        """Stop training ``layer``: ``requires_grad`` off, gradients dropped, its BatchNorms in eval mode."""
        for parameter in self._parameters(module, layer):
            parameter.requires_grad_(False)
            parameter.grad = None
        self.frozen[layer] = epoch


class EpochClock(pl.Callback):
    """Test accuracy at each epoch end, with the time the fit had trained by then (the evaluation taken out).

    Attributes after the fit: ``points`` (epoch, wall seconds, CPU seconds, accuracy) and ``paused`` /
    ``paused_cpu`` (the evaluation's own time, to subtract from the fit's).
    """

    def __init__(self, test: tuple[Tensor, Tensor]) -> None:
        self.test = test
        self.points: list[tuple[int, float, float, float]] = []
        self.paused = self.paused_cpu = 0.0
        self._start = self._start_cpu = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._start_cpu = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        elapsed, elapsed_cpu = wall - self._start - self.paused, cpu - self._start_cpu - self.paused_cpu
        self.points.append((trainer.current_epoch + 1, elapsed, elapsed_cpu, accuracy(pl_module, self.test)))
        self.paused += time.perf_counter() - wall
        self.paused_cpu += time.process_time() - cpu


@torch.no_grad()
def accuracy(model: nn.Module, test: tuple[Tensor, Tensor]) -> float:
    """Share of ``test`` classified correctly, in eval mode (the model's training flags are restored)."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    x, y = test
    predictions = torch.cat([model(chunk.to(model.device)).argmax(1).cpu() for chunk in x.split(256)])
    for module, flag in flags.items():
        module.training = flag
    return float((predictions == y).float().mean())


def time_to_accuracy(points: list[tuple[int, float, float, float]], target: float) -> float:
    """Training seconds (wall) at the first epoch end whose accuracy reaches ``target``; ``inf`` if none does."""
    return next((wall for _, wall, _, acc in points if acc >= target), float("inf"))


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


class CacheSpy(pl.Callback):
    """Counts the batches the prefix caches served over the fit (caches turned off or replaced by a longer one too).

    ``share`` is served batches over training steps, or ``None`` when no cache was ever built.
    """

    def __init__(self, callback: pl.Callback) -> None:
        self.callback = callback
        self.served: dict[object, int] = {}  # each cache built in the fit (kept, so not recycled) -> batches served
        self.share: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        cache = self.callback.monitor.freezing.freezer.cache
        if cache is not None:
            self.served[cache] = cache.skipped_batches

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.served:
            self.share = sum(self.served.values()) / max(1, trainer.global_step)
