"""What a type checker reads in the public constructors: checked by mypy in CI (``.ci/run``), never run.

The calls above the line are valid and must pass. Each call below it is a mistake mypy must report with the
error code in its ``# type: ignore[...]``: with ``warn_unused_ignores`` a mistake mypy stopped seeing is an error
too (an unused ignore), so this file passes only while mypy flags every one of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback, SVCCAMonitor
from lightning_svcca.huggingface import SVCCATrainerCallback
from lightning_svcca.lightning import SVCCACallback as LightningSVCCACallback

model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
probe = torch.randn(64, 4)
loader = DataLoader(TensorDataset(probe), batch_size=16)

# --- valid ---------------------------------------------------------------------------------------------------------
SVCCACallback()
SVCCACallback(probe, ["0", "2"], "previous", "svcca", 2, FreezePolicy(), probe_size=64, probe_autocast=True)
SVCCACallback(probe=loader, reference=("previous", "final"), metrics=["svcca", "pwcca"], every_n_train_steps=10)
SVCCACallback(layers={"0": {"reduction": "mean"}}, keep=8, cross_layer=(0.0, 1.0), max_snapshot_bytes=None)
LightningSVCCACallback(probe=probe, every_n_epochs=None, every_n_train_steps=5, compute_dtype="float32")
SVCCATrainerCallback(probe, writers=None, freeze=FreezePolicy(mode="convergence", lag=2), baseline=False)
SVCCATrainerCallback({"input_ids": probe.long()}, forward_fn=lambda m, batch: m(**batch), probe_mask=False)
with SVCCAMonitor(model, probe, ["0", "2"], log_dir="runs", probe_seed=3, heatmap_time_share=1.0) as monitor:
    monitor.start()
    rows: list[dict[str, object]] = monitor.measure(epoch=1, step=1)

# --- mistakes mypy reports -----------------------------------------------------------------------------------------
SVCCACallback(every_n_epoch=2)  # type: ignore[call-arg]
SVCCACallback(every_n_epochs="often")  # type: ignore[arg-type]
SVCCACallback(probe_sise=32)  # type: ignore[call-arg]
SVCCACallback(keep_by=0.9)  # type: ignore[arg-type]
SVCCACallback(probe_autocast="yes")  # type: ignore[arg-type]
LightningSVCCACallback(every_n_epoch=2)  # type: ignore[call-arg]
LightningSVCCACallback(every_n_epochs="often")  # type: ignore[arg-type]
SVCCATrainerCallback(probe, every_n_epoch=2)  # type: ignore[call-arg]
SVCCATrainerCallback(probe, every_n_epochs="often")  # type: ignore[arg-type]
SVCCATrainerCallback()  # type: ignore[call-arg]
SVCCAMonitor(model, every_n_epoch=2)  # type: ignore[call-arg]
SVCCAMonitor(model, every_n_epochs="often")  # type: ignore[arg-type]
SVCCAMonitor(model, probe_size="all")  # type: ignore[arg-type]
SVCCAMonitor(probe=probe)  # type: ignore[call-arg]
