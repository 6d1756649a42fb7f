"""SVCCA in a Lightning Fabric training loop: an :class:`~lightning_svcca.SVCCAMonitor` driven by hand.

Fabric has no callbacks to hook into, so the loop calls the monitor itself, as a plain PyTorch loop does
(``examples/plain_loop.py``): ``start()`` before the first step, ``measure(epoch=..., step=...)`` after each epoch,
``finish()`` at the end. The recipe:

* give the monitor the model that ``fabric.setup`` returned, and name layers as the model's author wrote them
  (``relu1``, not ``_forward_module.relu1``): the monitor looks through Fabric's wrapper (and through DDP and
  ``torch.compile`` inside it), and runs the probe with Fabric's precision (input casting, autocast);
* give it a :class:`~lightning_svcca.Runtime` that knows the processes: which one writes outputs, how to broadcast,
  and a collective over the process group when there are several (:func:`fabric_runtime`);
* nothing else: the probe runs in eval mode under ``no_grad`` and leaves the model, its training flags and the
  random streams as it found them.

Run::

    python examples/fabric_loop.py                 # 10 epochs, a few seconds on two CPU cores
    python examples/fabric_loop.py --precision bf16-mixed
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from lightning.fabric import Fabric
from torch.nn import functional
from torch.utils.data import DataLoader

from lightning_svcca import Runtime, SVCCAMonitor
from lightning_svcca.pipeline.distributed import ProcessGroupCollective
from lightning_svcca.pipeline.snapshot import LocalCollective
from lightning_svcca.pipeline.wrappers import wrapper_precision

from common import HelpFormatter, add_run_arguments, history_value, run_example
from digits import DigitsNet, accuracy, load_data

LAYERS = ("relu1", "relu2", "relu3", "fc2")


def fabric_runtime(fabric: Fabric, model: torch.nn.Module) -> Runtime:
    """What the monitor needs from Fabric: rank zero, broadcasts, a collective for several processes, precision."""
    return Runtime(
        collective=ProcessGroupCollective() if fabric.world_size > 1 else LocalCollective(),
        is_global_zero=fabric.is_global_zero,
        broadcast=lambda obj: fabric.broadcast(obj, src=0),
        **wrapper_precision(model),
    )


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train the digits CNN with Fabric and the monitor; return accuracy, history and monitored layers."""
    fabric = Fabric(accelerator="cpu", devices=1, precision=args.precision)
    fabric.launch()
    train_data, test_data = load_data()
    epochs = 3 if args.quick else 10
    model = DigitsNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(
        DataLoader(train_data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    )
    with SVCCAMonitor(
        model,
        probe=test_data.tensors[0][: 300 if args.quick else 500],
        layers=LAYERS,
        reference=("previous", "final"),
        log_dir=args.root,
        runtime=fabric_runtime(fabric, model),
    ) as monitor:
        monitor.start()
        step = 0
        for epoch in range(epochs):
            model.train()
            for x, y in loader:
                loss = functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                fabric.backward(loss)
                optimizer.step()
                step += 1
            monitor.measure(epoch=epoch + 1, step=step)
        monitor.finish(epoch=epochs, step=step)
    result = {"accuracy": accuracy(model, test_data), "history": monitor.history, "layers": monitor.layers}
    if fabric.is_global_zero:
        print(format_summary(result, epochs))
    return result


def format_summary(result: dict[str, Any], epochs: int) -> str:
    """Per layer: SVCCA to the previous epoch at the end and to the final model after the first epoch."""

    def value(layer: str, reference: str, epoch: int) -> str:
        return history_value(result["history"], layer, reference, epoch)

    lines = [f"test accuracy {result['accuracy']:.3f}", f"{'layer':<8}{'previous@end':>14}{'final@1':>10}"]
    for layer in result["layers"]:
        lines.append(f"{layer:<8}{value(layer, 'previous', epochs):>14}{value(layer, 'final', 1):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_arguments(
        parser,
        __file__,
        root_help="svcca_history.csv goes here",
        quick_help="3 epochs and a smaller probe (what the tests run)",
    )
    parser.add_argument("--precision", default="32-true", help="Fabric's precision, e.g. 32-true or bf16-mixed")
    return run_example(train, parser.parse_args(argv))


if __name__ == "__main__":
    main()
