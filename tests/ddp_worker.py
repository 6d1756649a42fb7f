"""A 2-process CPU (gloo) DDP run of SVCCACallback, launched by the tests as a subprocess.

Usage: python tests/ddp_worker.py SCENARIO OUT_DIR [--devices N] [--resume CKPT]

Each process writes ``rank{r}.json`` to OUT_DIR: frozen layers, history, requires_grad flags and a checksum of
every parameter, so the test can check that ranks agree and that frozen weights did not move.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_svcca import FreezePolicy, SVCCACallback  # noqa: E402

from digits_models import DigitsCNN, digits_tensors  # noqa: E402

LAYERS = ["relu1", "relu2", "relu3", "fc2"]


class _CacheCounters(pl.Callback):
    """The prefix cache's counters at the end of training (the fit's teardown deletes the cache)."""

    def __init__(self, callback: SVCCACallback) -> None:
        self.callback, self.counters = callback, None

    def on_train_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        cache = self.callback.monitor.freezing.freezer.cache
        if cache is not None:
            self.counters = {"enabled": cache.enabled, "skipped": cache.skipped_batches, "entries": len(cache)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["freeze", "measure", "cache", "nocache"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--shard", type=int, default=1)
    parser.add_argument("--tensorboard", action="store_true", help="Lightning's TensorBoard logger (its default)")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    (x_train, y_train), (x_probe, _), _ = digits_tensors()
    # cache scenarios: with and without the prefix cache, loader unshuffled (Lightning's sampler still reshuffles)
    shuffle = args.scenario not in ("cache", "nocache")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=shuffle
    )
    freeze = None
    if args.scenario != "measure":
        schedule = {"relu1": 1, "relu2": 2}
        freeze = FreezePolicy(mode="schedule", schedule=schedule, cache_outputs=args.scenario == "cache")
    callback = SVCCACallback(
        probe=x_probe,
        layers=LAYERS,
        reference=["previous", "initial", "final", {"pixels": x_probe.flatten(1)}],
        metrics=["svcca", "pwcca", "linear_cka"],
        freeze=freeze,
        shard_probe=bool(args.shard),
        heatmap_time_share=1.0 if args.tensorboard else 0.05,  # every heatmap at every measurement: none waits
    )
    checkpoints = ModelCheckpoint(dirpath=args.out / "checkpoints", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        default_root_dir=args.out,
        callbacks=[callback, checkpoints, counters := _CacheCounters(callback)],
        logger=TensorBoardLogger(args.out, name="tb") if args.tensorboard else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=6,
    )
    model = DigitsCNN()
    trainer.fit(model, loader, ckpt_path=args.resume)
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "frozen": callback.frozen,
        "history": callback.history,
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "checksums": {name: float(p.detach().double().sum()) for name, p in model.named_parameters()},
        "cache": counters.counters,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), args.out / "final_weights.pt")
    os.environ.pop("LOCAL_RANK", None)


if __name__ == "__main__":
    main()
