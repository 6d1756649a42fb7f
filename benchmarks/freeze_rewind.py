"""Would a rewind test time a fine-tune's freeze? The probe loss with the layers below the head set back a lag.

Zhang, Bengio and Singer (2019, "Are all layers created equal?") reset a layer to its weights from earlier in
training and measure how much the network's loss changes: a layer whose recent updates can be undone at no cost is
done learning. This script asks whether that signal separates the freeze epochs that cost nothing from those that
cost accuracy on the fine-tuning workloads of ``freeze_benchmark.py``, where the held-out loss the task gate reads
could not (``docs/freezing.md``: (c) can freeze its encoder after epoch 3, (d) and (e) lose 0.6 and 2.3 points
there).

Each seed fits the baseline (no callback) and, at every epoch end ``t``, on the validation probe:

* ``loss``: the probe's cross-entropy now;
* ``rewound``: the same with every parameter but the head's set back to its value at epoch ``t - lag``, where
  ``lag = max(1, floor(t / 2 + 1/2))`` (the task gate's and the default rule's window), the head as it is now;
* ``rise``: ``rewound / loss - 1``, what undoing the lower layers' recent updates costs the probe.

Printed per epoch with the test accuracy; the fixed-freeze outcomes to read them against are in
``benchmarks/results/freeze_oracle_cd.txt`` and ``freeze_e_seed0.txt``.

Run: ``python benchmarks/freeze_rewind.py [--workloads c d e] [--seeds 0 1] [--threads 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_benchmark import fit, run_quietly, seeded_workloads  # noqa: E402
from freeze_workloads import Classifier, Sizes  # noqa: E402


class RewindProbe(pl.Callback):
    """At each epoch end: the probe's loss, and its loss with every parameter outside ``head`` set back a lag."""

    def __init__(self, probe: tuple[Tensor, Tensor], head: str) -> None:
        self.probe, self.head = probe, head
        self.kept: list[dict[str, Tensor]] = []  # the lower parameters after each epoch (index 0: before training)
        self.rows: list[tuple[int, int, float, float]] = []  # (epoch, lag, loss, rewound)

    def _lower(self, model: nn.Module) -> dict[str, Tensor]:
        prefix = self.head + "."
        return {
            name: parameter.detach().clone()
            for name, parameter in model.named_parameters()
            if parameter.requires_grad and not name.startswith(prefix)
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.kept = [self._lower(pl_module)]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        self.kept.append(self._lower(pl_module))
        lag = max(1, math.floor(epoch / 2 + 0.5))
        loss = self._probe_loss(pl_module)
        parameters = dict(pl_module.named_parameters())
        now = self.kept[epoch]
        with torch.no_grad():
            for name, value in self.kept[epoch - lag].items():
                parameters[name].copy_(value)
            rewound = self._probe_loss(pl_module)
            for name, value in now.items():
                parameters[name].copy_(value)
        self.rows.append((epoch, lag, loss, rewound))

    @torch.no_grad()
    def _probe_loss(self, model: nn.Module) -> float:
        flags = {module: module.training for module in model.modules()}
        model.eval()
        x, y = self.probe
        loss = float(nn.functional.cross_entropy(model(x.to(model.device)), y.to(model.device)))
        for module, flag in flags.items():
            module.training = flag
        return loss


def rewind_rows(workloads: list[str], seeds: list[int], sizes: Sizes, root: Path) -> dict[tuple[str, int], list]:
    """(workload, seed) -> [(epoch, test accuracy, lag, loss, rewound)]."""
    table = {}
    for seed, key, work, initial in seeded_workloads(workloads, seeds, sizes, root):
        model: Classifier = copy.deepcopy(initial)
        probe = RewindProbe(work.probe, head=initial.layers[-1])
        run = fit(model, work, None, seed, root / f"{key}{seed}", extra_callbacks=[probe])
        accuracies = {epoch: accuracy for epoch, _, _, accuracy in run.points}
        table[key, seed] = [(epoch, accuracies[epoch], lag, loss, rewound) for epoch, lag, loss, rewound in probe.rows]
        print(report({(key, seed): table[key, seed]}), flush=True)
    return table


def report(table: dict[tuple[str, int], list]) -> str:
    """One block per workload and seed."""
    lines = []
    for (key, seed), rows in table.items():
        lines += [f"({key}) seed {seed}: epoch, test accuracy, lag, probe loss, rewound, rise"]
        for epoch, accuracy, lag, loss, rewound in rows:
            lines.append(
                f"{epoch:>5} {100 * accuracy:>6.1f} {lag:>4} {loss:>7.3f} {rewound:>8.3f} {rewound / loss - 1:>+7.1%}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[tuple[str, int], list]:
    """Parse the command line, fit, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=["c", "d", "e"], default=["c", "d", "e"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny data, 3 epochs: a smoke test")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    return run_quietly(args.threads, None, lambda root: rewind_rows(args.workloads, args.seeds, sizes, root))


if __name__ == "__main__":
    main()
