"""SVCCA on a Transformer over variable-length sequences: frames as datapoints, padding left out.

The task is synthetic: each sequence (10 to 40 frames, zero-padded to 40) carries a noisy sine of one of four
frequencies, with a random phase, next to a distractor sine of random frequency and a noise channel; the model
says which frequency. It is a small Transformer encoder (``nn.TransformerEncoder``, ``batch_first=True``) with
an input projection, two encoder layers, masked mean pooling over the real frames and a linear classifier.

:class:`~lightning_svcca.SVCCACallback` gets the probe as a dict batch ``{"x", "mask", "y"}`` with a ``(N, T)``
bool padding mask (True = real frame): ``probe_input="x"`` and ``probe_mask="mask"`` tell it which part is
which, and ``forward_fn`` calls the model with the mask (it becomes ``src_key_padding_mask``). For the per-frame
layers (input projection, encoder layers) every real frame of every probe sequence is a datapoint; padded frames
are left out. The classifier gives one datapoint per sequence.

The script prints the test accuracy and, per layer (bottom-up), the SVCCA similarity to the final model over the
epochs. It also checks that padding never enters the activations: a second callback watches the same training
run with a probe whose padded frames are filled with a huge value (1e4); its similarities must match the first
one's.

Run::

    python examples/sequence_frames.py            # under a minute on two CPU cores
    python examples/sequence_frames.py --quick    # a few epochs, a smaller probe (what the tests run)
    tensorboard --logdir runs/sequence_frames

TensorBoard events and ``svcca_history.csv`` go under ``--root``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback
from lightning_svcca.output.reporting import HISTORY_FILE, history_matrix

from common import HelpFormatter, add_run_arguments, run_example

#: Monitored layers, bottom-up: per-frame input projection, each encoder layer, the per-sequence classifier.
LAYERS = ("proj", "encoder.layers.0", "encoder.layers.1", "classifier")
FREQUENCIES = (0.35, 0.6, 0.85, 1.1)  # radians per frame, one per class
MIN_LENGTH, MAX_LENGTH = 10, 40
FEATURES = 3
NOISE = 0.3  # standard deviation of the noise added to every channel
DISTRACTOR = 0.6  # amplitude of the distractor sine
PAD_POISON = 1e4
TABLE_TITLE = "SVCCA similarity to the final model, per layer (bottom-up) and epoch"


def make_sequences(n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """``n`` synthetic sequences: ``{"x": (n, T, 3), "mask": (n, T) bool, "y": (n,)}``, zero-padded to ``T=40``.

    Channel 0 carries the class's frequency (random phase and amplitude, plus noise), channel 1 a distractor
    sine of a random frequency, channel 2 noise.
    """
    y = torch.randint(len(FREQUENCIES), (n,), generator=generator)
    lengths = torch.randint(MIN_LENGTH, MAX_LENGTH + 1, (n,), generator=generator)
    t = torch.arange(MAX_LENGTH, dtype=torch.float32)[None, :]
    omega = torch.tensor(FREQUENCIES)[y][:, None]
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    amplitude = 0.7 + 0.6 * torch.rand(n, 1, generator=generator)
    distractor = 0.3 + 1.2 * torch.rand(n, 1, generator=generator)
    distractor_phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    x = torch.stack(
        [
            amplitude * torch.sin(omega * t + phase),
            DISTRACTOR * torch.sin(distractor * t + distractor_phase),
            torch.zeros(n, MAX_LENGTH),
        ],
        dim=-1,
    )
    x = x + NOISE * torch.randn(n, MAX_LENGTH, FEATURES, generator=generator)
    mask = torch.arange(MAX_LENGTH)[None, :] < lengths[:, None]
    x = x * mask[..., None]
    return {"x": x, "mask": mask, "y": y}


def sinusoids(length: int, width: int) -> Tensor:
    """The Transformer's fixed sinusoidal position encoding ``(length, width)`` (Vaswani et al. 2017)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float32) / width)
    encoding = torch.zeros(length, width)
    encoding[:, 0::2] = torch.sin(position * rate)
    encoding[:, 1::2] = torch.cos(position * rate)
    return encoding


class FrequencyTransformer(pl.LightningModule):
    """Input projection, sinusoidal positions, a Transformer encoder, masked mean pooling, a linear classifier.

    Args:
        d_model: width of the frames inside the model.
        num_layers: encoder layers.
        lr: AdamW learning rate.
    """

    def __init__(self, d_model: int = 32, num_layers: int = 2, lr: float = 6e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.proj = nn.Linear(FEATURES, d_model)
        self.register_buffer("position", sinusoids(MAX_LENGTH, d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        # No nested tensors: the encoder layers then return ordinary (N, T, C) tensors to the callback's hooks.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(d_model, len(FREQUENCIES))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Logits of sequences ``x`` ``(N, T, 3)`` with padding mask ``mask`` ``(N, T)`` (True = real frame)."""
        h = self.proj(x) + self.position[: x.shape[1]]
        h = self.encoder(h, src_key_padding_mask=~mask)
        weights = mask[..., None].to(h.dtype)
        pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.classifier(pooled)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on a batch ``(x, mask, y)``."""
        x, mask, y = batch
        loss = nn.functional.cross_entropy(self(x, mask), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW."""
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def forward_with_mask(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """How the callback runs the model on (a chunk of) the probe batch: with its padding mask."""
    return model(batch["x"], batch["mask"])


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, Tensor]) -> float:
    """Fraction of correctly classified sequences (evaluated in eval mode; the model's mode is restored)."""
    training = model.training
    model.eval()
    correct = (model(data["x"], data["mask"]).argmax(dim=1) == data["y"]).float().mean().item()
    model.train(training)
    return correct


def poisoned(probe: dict[str, Tensor], value: float = PAD_POISON) -> dict[str, Tensor]:
    """The same probe with every padded frame's features set to ``value``."""
    x = torch.where(probe["mask"][..., None], probe["x"], torch.full_like(probe["x"], value))
    return {**probe, "x": x}


def monitor(probe: dict[str, Tensor], reference: Any) -> SVCCACallback:
    """A callback on the probe's real frames."""
    return SVCCACallback(
        probe=probe,
        layers=list(LAYERS),
        reference=reference,
        probe_input="x",
        probe_mask="mask",
        forward_fn=forward_with_mask,
    )


def final_values(history: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """``(layer, epoch) -> SVCCA to the final model``."""
    return {
        (row["layer"], row["epoch"]): row["value"]
        for row in history
        if row["reference"] == "final" and row["metric"] == "svcca"
    }


def format_table(history: list[dict[str, Any]], layers: list[str], columns: int = 11) -> str:
    """Plain-text table: one row per layer (bottom-up), SVCCA to the final model at up to ``columns`` epochs."""
    names, epochs, matrix = history_matrix(history, "final", "svcca", layers)
    shown = epochs[:: math.ceil(len(epochs) / (columns - 1))]
    shown += [] if shown[-1] == epochs[-1] else [epochs[-1]]
    width = max(len(name) for name in names) + 2
    header = f"{'layer':<{width}}" + "".join(f"{f'ep{e}':>6}" for e in shown)
    lines = [TABLE_TITLE, header, "-" * len(header)]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}" + "".join(f"{matrix[i, epochs.index(e)]:>6.2f}" for e in shown))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Then: tensorboard --logdir <root>. The history CSV is <root>/seed<seed>/version_<n>/svcca_history.csv.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=15, help="training epochs")
    parser.add_argument("--train-size", type=int, default=2000, help="training sequences")
    parser.add_argument("--test-size", type=int, default=500, help="held-out sequences (the probe is taken from them)")
    parser.add_argument(
        "--probe-size",
        type=int,
        default=300,
        help="held-out sequences in the probe; each contributes its real frames (up to 4096 // probe-size)",
    )
    parser.add_argument("--lr", type=float, default=6e-3, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    add_run_arguments(
        parser,
        __file__,
        root_help="where TensorBoard events and svcca_history.csv go",
        quick_help="a short run for the tests: 5 epochs and a 150-sequence probe (the table is printed all the same)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train with the callbacks, print the table and the masking check, and return the results (for the tests).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        ``accuracy`` (on the held-out sequences), ``layers`` (bottom-up), ``final`` (``(layer, epoch)`` ->
        SVCCA to the final model), ``poisoned_final`` (the same from the probe with poisoned padding),
        ``mask_max_difference`` (the largest difference between the two), ``epochs``, ``history``, ``log_dir``
        and ``csv``.
    """
    args = parse_args(argv)
    if args.quick:
        args.epochs, args.probe_size = 5, 150
    return run_example(run, args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The body of :func:`main`, on parsed arguments."""
    generator = torch.Generator().manual_seed(args.seed)
    train = make_sequences(args.train_size, generator)
    test = make_sequences(args.test_size, generator)
    probe = {key: value[: args.probe_size] for key, value in test.items()}

    callback = monitor(probe, ("previous", "final"))
    # The check: the same run seen through a probe whose padded frames hold 1e4. A different reference set keeps
    # the two callbacks' checkpoint keys apart (Lightning wants them unique).
    check = monitor(poisoned(probe), "final")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[callback, check],
        logger=TensorBoardLogger(args.root, name=f"seed{args.seed}"),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
    )
    model = FrequencyTransformer(lr=args.lr)
    loader = DataLoader(TensorDataset(train["x"], train["mask"], train["y"]), batch_size=args.batch_size, shuffle=True)
    trainer.fit(model, loader)

    test_accuracy = accuracy(model, test)
    clean, dirty = final_values(callback.history), final_values(check.history)
    difference = max((abs(clean[key] - dirty.get(key, math.inf)) for key in clean), default=math.inf)
    log_dir = Path(trainer.log_dir)

    print(
        f"\ntest accuracy: {test_accuracy:.3f} on {args.test_size} held-out sequences (chance {1 / len(FREQUENCIES)})"
    )
    print(f"probe: {len(probe['y'])} sequences, {int(probe['mask'].sum())} real frames\n")
    print(format_table(callback.history, callback.layers))
    print(
        "(proj is an affine map of the 3 input features, and SVCCA does not see invertible linear maps:"
        " it stays at 1.00)"
    )
    verdict = "padding ignored" if difference < 1e-6 else "PADDING LEAKS INTO THE ACTIVATIONS"
    print(
        f"\nmasking check: padded frames set to {PAD_POISON:g}, largest SVCCA difference {difference:.1e} ({verdict})"
    )
    print(f"\nTensorBoard: tensorboard --logdir {args.root}")
    print(f"history CSV: {log_dir / HISTORY_FILE}")
    return {
        "accuracy": test_accuracy,
        "layers": callback.layers,
        "final": clean,
        "poisoned_final": dirty,
        "mask_max_difference": difference,
        "epochs": args.epochs,
        "history": callback.history,
        "log_dir": log_dir,
        "csv": log_dir / HISTORY_FILE,
    }


if __name__ == "__main__":
    main()
