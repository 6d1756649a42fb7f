"""Record SVCCA histories of the benchmark's workloads (no freezing) for ``freeze_rule_replay.py``.

Each workload's baseline (``freeze_workloads.py``, no freezing) is fitted once per seed while a callback keeps
every monitored layer's activations on a fixed probe (256 training inputs) before training and after every
epoch. Afterwards each layer at each epoch ``t`` is compared with SVCCA (``keep=0.99``, as the callback's
default) with every earlier epoch ``t' < t``: rows in the library's history format (dicts with epoch, step,
layer, reference, metric, value) with reference ``lag{t - t'}``, plus ``initial`` (``t' = 0``), ``previous``
(``t' = t - 1``) and ``baseline`` (the layer against itself with the datapoint pairing shuffled, as the
callback's noise floor). So any rule that needs ``s(t, t - lag)`` for any lag can be replayed offline.

Activations are reduced as the callback's ``reduction="positions"`` does: each conv position or sequence token
is a datapoint, at most ``4096 // 256 = 16`` per probe sample (a fixed random choice, the same at every epoch).

Run: ``python benchmarks/freeze_recording.py --workloads a b c d [e] --seeds 0 [--quick] [--out DIR]``; writes
``{out}/{workload}_seed{seed}.json`` with the layers, the epochs, the per-epoch test accuracy and CPU seconds,
and the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_benchmark import Workload, bert_workloads, conv_workload, fit, stdlib_workload  # noqa: E402
from freeze_workloads import Sizes  # noqa: E402

from lightning_svcca import svcca  # noqa: E402

MAX_DATAPOINTS = 4096


class ActivationRecorder(pl.Callback):
    """Keeps each layer's probe activations (datapoints x features, float32) before training and per epoch."""

    def __init__(self, probe: Tensor, layers: list[str]) -> None:
        self.probe, self.layers = probe, layers
        self.snapshots: list[dict[str, Tensor]] = []
        self.cpu_seconds: list[float] = []
        self._positions: dict[str, Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module)

    @torch.no_grad()
    def _record(self, model: nn.Module) -> None:
        start = time.process_time()
        outputs: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        hooks = [
            modules[name].register_forward_hook(
                lambda _m, _i, out, name=name: outputs.__setitem__(name, (out[0] if isinstance(out, tuple) else out))
            )
            for name in self.layers
        ]
        training = model.training
        model.eval()
        try:
            model(self.probe.to(model.device))
        finally:
            model.train(training)
            for hook in hooks:
                hook.remove()
        self.snapshots.append({name: self._datapoints(name, outputs[name].detach().float().cpu()) for name in outputs})
        self.cpu_seconds.append(time.process_time() - start)

    def _datapoints(self, name: str, output: Tensor) -> Tensor:
        if output.ndim == 4:  # (N, C, H, W) -> (N, positions, C)
            output = output.flatten(2).transpose(1, 2)
        if output.ndim == 2:
            return output
        per_sample = max(1, MAX_DATAPOINTS // output.shape[0])
        if name not in self._positions:
            generator = torch.Generator().manual_seed(len(self._positions))
            self._positions[name] = torch.randperm(output.shape[1], generator=generator)[:per_sample]
        return output[:, self._positions[name]].reshape(-1, output.shape[-1])


def history_rows(snapshots: list[dict[str, Tensor]], layers: list[str]) -> list[dict]:
    """SVCCA of every layer at every epoch against every earlier epoch, and the shuffled baseline."""
    rows = []
    for epoch in range(1, len(snapshots)):
        for layer in layers:
            now = snapshots[epoch][layer]
            shuffle = torch.randperm(now.shape[0], generator=torch.Generator().manual_seed(now.shape[0]))
            values = {"baseline": _svcca(now, now[shuffle])}
            for earlier in range(epoch):
                value = _svcca(now, snapshots[earlier][layer])
                values[f"lag{epoch - earlier}"] = value
                if earlier == 0:
                    values["initial"] = value
                if earlier == epoch - 1:
                    values["previous"] = value
            rows += [
                {"epoch": epoch, "step": None, "layer": layer, "reference": name, "metric": "svcca", "value": value}
                for name, value in values.items()
            ]
    return rows


def _svcca(x: Tensor, y: Tensor) -> float:
    try:
        return float(svcca(x.double(), y.double(), keep=0.99))
    except Exception:  # a layer with no variance (e.g. before training) has no SVCCA
        return float("nan")


def record(work: Workload, seed: int, root: Path) -> dict:
    """Fit the workload's baseline once and return its layers, accuracy curve and history rows."""
    pl.seed_everything(seed, verbose=False)
    model = work.make_model()
    recorder = ActivationRecorder(work.probe_inputs, model.layers)
    run = fit(model, work, None, seed, root, extra_callbacks=[recorder])
    return {
        "layers": model.layers,
        "epochs": work.epochs,
        "accuracy": [point[3] for point in run.points],
        "cpu_seconds": [point[2] for point in run.points],
        "rows": history_rows(recorder.snapshots, model.layers),
    }


def main(argv: list[str] | None = None) -> None:
    """Record the histories of the chosen workloads and seeds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["a", "b", "c", "d"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "freeze_histories")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = Sizes.quick() if args.quick else Sizes()
    for name in ("pytorch_lightning", "lightning_svcca", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
        warnings.filterwarnings("ignore")
        for seed in args.seeds:
            bert = bert_workloads(seed, sizes, Path(scratch)) if {"c", "d"} & set(args.workloads) else {}
            for key in args.workloads:
                work = conv_workload(key, sizes) if key in "ab" else stdlib_workload(sizes) if key == "e" else bert[key]
                result = {"workload": key, "seed": seed, **record(work, seed, Path(scratch) / key)}
                (args.out / f"{key}_seed{seed}.json").write_text(json.dumps(result))
                print(f"{key} seed {seed}: accuracy {[round(a, 4) for a in result['accuracy']]}", flush=True)


if __name__ == "__main__":
    main()
