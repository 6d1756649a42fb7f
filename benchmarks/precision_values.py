"""What the Trainer's precision does to the values: SVCCA of the digits CNN at initialisation to another model.

The digits CNN of the tests (``tests/digits_models.py``: ``conv1`` 8 channels, ``conv2`` 16, ``fc1`` 32 units,
``fc2`` 10) at its initial weights (seed 0) is measured against the same network with other random weights
(seed 1, a float32 reference model), on a probe of the first 1024 sklearn digits, once per
``Trainer(precision=...)`` (``16-mixed`` needs a GPU and is left out). Only the measurement before training
(epoch 0) is read, so every row sees the same weights: differences come from the precision the probe runs in.
Prints, per precision, each layer's SVCCA to the other model and the directions kept (the ``dims`` reference) as
the Markdown table of ``docs/models.md``.

Run: ``python benchmarks/precision_values.py [--quick]`` (``--quick``: a probe of 128 digits, a smoke test).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lightning_svcca import SVCCACallback  # noqa: E402

from digits_models import DigitsCNN, digit_images  # noqa: E402

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
#: Table label, then the Trainer's precision and the callback's ``probe_autocast``.
ROWS = {
    "`32-true`": ("32-true", False),
    "`64-true`": ("64-true", False),
    "`bf16-mixed` (default)": ("bf16-mixed", False),
    "`16-true`": ("16-true", False),
    "`bf16-true`": ("bf16-true", False),
    "`bf16-mixed` with `probe_autocast=True`": ("bf16-mixed", True),
}


def initial_values(precision: str, probe_autocast: bool, probe: torch.Tensor, root: Path) -> dict[str, list[float]]:
    """SVCCA to the other model and directions kept, per layer, measured before the first training step."""
    torch.manual_seed(1)
    other = DigitsCNN()
    torch.manual_seed(0)
    model = DigitsCNN()
    callback = SVCCACallback(
        probe=probe, layers=LAYERS, reference=({"other": other},), probe_autocast=probe_autocast, baseline=False
    )
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        precision=precision,
        accelerator="cpu",
        default_root_dir=root / f"{precision}-{probe_autocast}",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(probe, torch.zeros(len(probe), dtype=torch.long)), batch_size=64))
    rows = [row for row in callback.history if row["epoch"] == 0]
    values = {(row["reference"], row["layer"]): row["value"] for row in rows}
    return {reference: [values[(reference, layer)] for layer in LAYERS] for reference in ("other", "dims")}


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """Parse the command line, measure under every precision, print the table and return its values."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", type=int, default=1024, help="probe digits (the first ones of sklearn's set)")
    parser.add_argument("--quick", action="store_true", help="a probe of 128 digits")
    args = parser.parse_args(argv)
    probe = digit_images()[0][: 128 if args.quick else args.probe]
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_svcca").setLevel(logging.WARNING)
    results = {}
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as root:
        warnings.simplefilter("ignore")
        for label, (precision, autocast) in ROWS.items():
            results[label] = initial_values(precision, autocast, probe, Path(root))
    print(f"digits CNN at initialisation, SVCCA to another random model; probe of {len(probe)} digits;")
    print(f"layers {', '.join(LAYERS)}; torch {torch.__version__}\n")
    print("| probe | SVCCA vs other model | kept directions |")
    print("|---|---|---|")
    for label, values in results.items():
        similarity = " ".join(f"{value:.4f}" for value in values["other"])
        kept = " ".join(f"{value:.0f}" for value in values["dims"])
        print(f"| {label} | {similarity} | {kept} |")
    return results


if __name__ == "__main__":
    main()
