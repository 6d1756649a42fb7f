"""SVCCA in a plain PyTorch training loop: no Lightning, TensorBoard through a ``SummaryWriter``, freeze training.

The digits CNN of the other examples, as a plain ``nn.Module``, trained by a hand-written loop. An
:class:`~lightning_svcca.SVCCAMonitor` does what the Lightning callback does: ``start()`` before the first step
measures the initial model, ``measure(epoch=..., step=...)`` after each epoch compares every layer with the
previous epoch (and freezes converged layers, bottom-up, with ``--freeze``), ``finish()`` compares every epoch
with the final model. What the loop itself must do for freezing:

* call ``monitor.before_batch()`` after ``model.train()``: frozen BatchNorm layers go back to eval mode, so their
  running statistics stay fixed;
* nothing else: frozen parameters get ``requires_grad=False`` and no gradient, and every torch optimizer skips
  parameters without a gradient, so the optimizer needs no rebuilding (momentum and weight decay of frozen
  parameters stop too).

Run::

    python examples/plain_loop.py --freeze        # 20 epochs, a few seconds on two CPU cores
    tensorboard --logdir runs/plain_loop           # the same curves and heatmaps as with the callback
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.nn import functional
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from lightning_svcca import Convergence, FreezePolicy, SVCCAMonitor

from common import HelpFormatter, add_run_arguments, history_value, run_example
from digits import DigitsNet, accuracy, load_data

LAYERS = ("relu1", "relu2", "relu3")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train with the monitor attached; return accuracy, history and freezes."""
    train_data, test_data = load_data()
    epochs = 6 if args.quick else 20
    model = DigitsNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(train_data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    args.root.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(args.root))
    policy = FreezePolicy(Convergence(threshold=0.98, lag=2)) if args.freeze else None
    with SVCCAMonitor(
        model,
        probe=test_data.tensors[0][: 200 if args.quick else 500],
        layers=LAYERS,
        reference=("previous", "final"),
        freeze=policy,
        writers=writer,
        log_dir=args.root,
    ) as monitor:
        monitor.start()
        step = 0
        for epoch in range(epochs):
            model.train()
            for x, y in loader:
                monitor.before_batch(epoch=epoch)
                loss = functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
            monitor.measure(epoch=epoch + 1, step=step)
        monitor.finish(epoch=epochs, step=step)
    writer.close()
    result = {"accuracy": accuracy(model, test_data), "history": monitor.history, "frozen": dict(monitor.frozen)}
    print(format_summary(result, epochs))
    return result


def format_summary(result: dict[str, Any], epochs: int) -> str:
    """Per layer: SVCCA to the previous epoch at the end, to the final model at epoch 1, and its freeze epoch."""
    history = result["history"]

    def value(layer: str, reference: str, epoch: int) -> str:
        return history_value(history, layer, reference, epoch)

    lines = [
        f"test accuracy {result['accuracy']:.3f}",
        f"{'layer':<8}{'previous@end':>14}{'final@1':>10}{'frozen at':>11}",
    ]
    for layer in LAYERS:
        frozen = result["frozen"].get(layer)
        lines.append(
            f"{layer:<8}{value(layer, 'previous', epochs):>14}{value(layer, 'final', 1):>10}"
            f"{'-' if frozen is None else frozen:>11}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_arguments(
        parser,
        __file__,
        root_help="TensorBoard events and svcca_history.csv go here",
        quick_help="6 epochs and a smaller probe (what the tests run)",
    )
    parser.add_argument("--freeze", action="store_true", help="freeze converged layers (lag 2, threshold 0.98)")
    return run_example(train, parser.parse_args(argv))


if __name__ == "__main__":
    main()
