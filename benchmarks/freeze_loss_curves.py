"""Loss curves of the freeze benchmark's baselines: what the freeze rule's task gate is derived from.

Fits each workload of ``freeze_benchmark.py`` once without the callback (seed 0 by default) and records every
training batch's loss, and at the start and every epoch end the test accuracy and the loss of a held-out probe
(the first 256 test samples: what a probe drawn from validation data sees), into
``freeze_loss_curves/<key>_seed<seed>.json``.

Run: ``python benchmarks/freeze_loss_curves.py [--workloads a b c d e] [--seeds 0] [--quick]`` to record;
``--replay`` reads the recorded curves instead and prints, at every epoch, the test accuracy, both losses, the
gate's pace of each and its verdict with the default ``TaskGate()`` (``x``: waits for progress, ``.``: allows,
``F``: the task has plateaued, so every layer below the top may freeze).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_benchmark import bert_workloads, conv_workload, fit, run_quietly, stdlib_workload  # noqa: E402
from freeze_workloads import Sizes  # noqa: E402

from lightning_svcca import Movement  # noqa: E402
from lightning_svcca.freezing.task_signal import (  # noqa: E402
    START_BATCHES,
    CurveReading,
    TaskGate,
    TaskSignal,
    read_curve,
)

HISTORIES = Path(__file__).resolve().parent / "freeze_loss_curves"


class LossRecorder(pl.Callback):
    """Every training batch's loss, in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.batches_per_epoch = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.batches_per_epoch = max(self.batches_per_epoch, batch_idx + 1)


class HeldOutLoss(pl.Callback):
    """Cross-entropy and predictions of held-out samples at the fit's start and every epoch end."""

    def __init__(self, held_out: tuple[Tensor, Tensor]) -> None:
        self.held_out = held_out
        self.losses: list[float] = []
        self.predictions: list[list[int]] = []

    @torch.no_grad()
    def _measure(self, model: nn.Module) -> None:
        flags = {module: module.training for module in model.modules()}
        model.eval()
        x, y = self.held_out
        logits = model(x)
        self.losses.append(float(nn.functional.cross_entropy(logits, y)))
        self.predictions.append(logits.argmax(1).tolist())
        for module, flag in flags.items():
            module.training = flag

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure(pl_module)


def record(workloads: list[str], seeds: list[int], sizes: Sizes, root: Path) -> None:
    for seed in seeds:
        bert = bert_workloads(seed, sizes, root) if {"c", "d"} & set(workloads) else {}
        for key in workloads:
            work = bert.get(key) or (stdlib_workload(sizes) if key == "e" else conv_workload(key, sizes))
            pl.seed_everything(seed, verbose=False)
            recorder, held_out = LossRecorder(), HeldOutLoss((work.test[0][:256], work.test[1][:256]))
            model = work.make_model()
            run = fit(model, work, None, seed, root / f"{key}{seed}", extra_callbacks=[recorder, held_out])
            out = {
                "workload": key, "seed": seed, "batches_per_epoch": recorder.batches_per_epoch,
                "losses": recorder.losses, "test_accuracy": [point[3] for point in run.points],
                "held_out_losses": held_out.losses, "held_out_predictions": held_out.predictions,
            }  # fmt: skip
            HISTORIES.mkdir(exist_ok=True)
            (HISTORIES / f"{key}_seed{seed}.json").write_text(json.dumps(out))
            per_epoch = [
                sum(recorder.losses[i : i + recorder.batches_per_epoch]) / recorder.batches_per_epoch
                for i in range(0, len(recorder.losses), recorder.batches_per_epoch)
            ]
            print(f"({key}) seed {seed}: epoch-mean loss " + " ".join(f"{v:.3f}" for v in per_epoch), flush=True)
            print(f"({key}) seed {seed}: test accuracy " + " ".join(f"{100 * a:.1f}" for a in out["test_accuracy"]))
            print(f"({key}) seed {seed}: held-out loss " + " ".join(f"{v:.3f}" for v in held_out.losses), flush=True)


def replay(workloads: list[str], seeds: list[int]) -> None:
    """Print the default gate's reading of each recorded curve, epoch by epoch."""
    gate = TaskGate()
    for seed in seeds:
        for key in workloads:
            path = HISTORIES / f"{key}_seed{seed}.json"
            if not path.exists():
                print(f"({key}) seed {seed}: no recording ({path.name}); run without --replay first")
                continue
            recorded = json.loads(path.read_text())
            per_epoch, losses = recorded["batches_per_epoch"], recorded["losses"]
            signal = TaskSignal()
            for loss in losses[:START_BATCHES]:
                signal.observe(loss)  # the starting level: the first batches
            signal.close_interval(recorded["held_out_losses"][0])  # measurement 0: the probe's loss before training
            signal.levels = []
            print(f"({key}) seed {seed}: epoch, test accuracy, training loss (pace), probe loss (pace), verdict")
            for epoch, accuracy in enumerate(recorded["test_accuracy"], start=1):
                signal.levels.append(statistics.mean(losses[(epoch - 1) * per_epoch : epoch * per_epoch]))
                signal.probe.append(recorded["held_out_losses"][epoch])
                verdict = gate.verdict(signal, Movement().loss_window)
                training = _pace(_reading("training loss", signal.start, signal.levels))
                probe = _pace(_reading("probe loss", signal.probe[0], signal.probe[1:]))
                mark = "F" if verdict.flat else "." if verdict.allows else "x"
                print(
                    f"  {epoch:>3} {100 * accuracy:6.1f}  {signal.levels[-1]:.3f} ({training})"
                    f"  {signal.probe[-1]:.3f} ({probe})  {mark}"
                )


def _reading(name: str, start: float | None, values: list) -> CurveReading | None:
    return read_curve(name, start, values, Movement().loss_window)


def _pace(reading: CurveReading | None) -> str:
    return "  -  " if reading is None or reading.pace is None else f"{reading.pace:+.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["a", "b", "c", "d"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replay", action="store_true", help="print the gate's verdicts on the recorded curves")
    args = parser.parse_args(argv)
    if args.replay:
        replay(args.workloads, args.seeds)
        return
    sizes = Sizes.quick() if args.quick else Sizes()
    run_quietly(1, None, lambda root: record(args.workloads, args.seeds, sizes, root))


if __name__ == "__main__":
    main()
