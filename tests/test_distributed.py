"""DDP on CPU (gloo): a sharded probe gives every process the single-process values; freezing and resuming work.

The Lightning runs go through ``tests/ddp_worker.py`` in a subprocess (Lightning's launcher starts the second
process), with a free port and a timeout; each process writes its results to ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_svcca.pipeline.metrics import cross_products, measure, pair_for
from lightning_svcca.pipeline.snapshot import LocalCollective, build_snapshot

WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_worker(out: Path, *args: str, devices: int = 2) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    command = [sys.executable, str(WORKER), *args, str(out), "--devices", str(devices)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(devices)]


class _GlooCollective:
    """Sum and gather over the default process group (what StrategyCollective does through Lightning)."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        from lightning_svcca.pipeline.distributed import StrategyCollective

        return StrategyCollective.gather_rows(self, tensor)  # type: ignore[arg-type]


def _sharded_values(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        values = _measure_all(_GlooCollective(), rank, world_size)
        torch.save(values, Path(out) / f"sharded{rank}.pt")
    finally:
        dist.destroy_process_group()


def _layers() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(600, 12, generator=generator)
    return {
        "gram_route": torch.relu(latent @ torch.randn(12, 40, generator=generator)) + 0.1,
        "svd_route": torch.randn(600, 900, generator=generator) * torch.linspace(1, 0.01, 900),
        "reference": latent @ torch.randn(12, 30, generator=generator)
        + 0.3 * torch.randn(600, 30, generator=generator),
    }


def _measure_all(collective, rank: int, world_size: int) -> dict[str, float]:
    snapshots = {}
    for name, full in _layers().items():
        n = full.shape[0]
        rows = full[n * rank // world_size : n * (rank + 1) // world_size]
        snapshots[name] = build_snapshot(
            rows,
            collective,
            name=name,
            keep=0.99,
            keep_by="singular_values",
            full_rank=True,
            with_right=True,
            input_eps=torch.finfo(torch.float32).eps,
        )
    values = {}
    for name in ("gram_route", "svd_route"):
        for metric in ("svcca", "cca", "pwcca", "linear_cka"):
            pair = pair_for(metric, snapshots[name], snapshots["reference"])
            (product,) = cross_products([pair], collective, device=torch.device("cpu"))
            values[f"{name}/{metric}"] = measure(metric, pair, product)
    return values


def test_sharded_statistics_equal_single_process(tmp_path):
    """Each of 2 processes holds half the rows: sums over gloo give the single-process values within 1e-6."""
    port = _free_port()
    mp.start_processes(_sharded_values, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    single = _measure_all(LocalCollective(), 0, 1)
    for rank in range(2):
        sharded = torch.load(tmp_path / f"sharded{rank}.pt")
        assert sharded.keys() == single.keys()
        for key, value in single.items():
            assert sharded[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_ddp_sharded_probe_matches_single_process(tmp_path):
    """Before training, both processes' values (dims, baselines, a feature reference) equal one process's."""
    ranks = _run_worker(tmp_path / "ddp", "measure", "--epochs", "1")
    single = _run_worker(tmp_path / "single", "measure", "--epochs", "1", devices=1)[0]

    def epoch0(result):
        # Epoch 0 is before any training step: the weights are the same seeded ones in both runs ("final" is not).
        rows = result["history"]
        return {
            (r["layer"], r["reference"], r["metric"]): r["value"]
            for r in rows
            if r["epoch"] == 0 and r["reference"] != "final"
        }

    expected = epoch0(single)
    assert {reference for _, reference, _ in expected} >= {"dims", "baseline", "pixels"}
    for result in ranks:
        got = epoch0(result)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), key
    assert ranks[0]["history"] == ranks[1]["history"]


@pytest.mark.slow
def test_ddp_freeze_mid_training_and_resume(tmp_path):
    """Default strategy="ddp", no find_unused_parameters: freezing mid-run trains on; resuming keeps the freezes.

    The first fit logs to TensorBoard, Lightning's default logger: rank zero draws the live ``final`` heatmap at each
    measurement alone. Its comparisons once went through a collective the other process never joined, and the run
    hung at its second measurement."""
    first = _run_worker(tmp_path / "first", "freeze", "--epochs", "4", "--tensorboard")
    events = next((tmp_path / "first" / "tb").rglob("events.out.tfevents*"))
    images = EventAccumulator(str(events), size_guidance={"images": 0}).Reload().Images("svcca/final/heatmap")
    assert {image.step for image in images} == {6, 12, 18, 24}  # drawn live on rank zero at each measurement
    for result in first:
        assert result["frozen"] == {"relu1": 1, "relu2": 2}
        assert not result["requires_grad"]["conv1.weight"] and not result["requires_grad"]["conv2.weight"]
        assert result["requires_grad"]["fc1.weight"] and result["requires_grad"]["fc2.weight"]
    assert first[0]["history"] == first[1]["history"]
    assert first[0]["checksums"] == first[1]["checksums"]

    checkpoint = tmp_path / "first" / "checkpoints" / "epoch=2-step=18.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    callback_state = next(value for key, value in state["callbacks"].items() if key.startswith("SVCCACallback"))
    assert callback_state["frozen"] == {"relu1": 1, "relu2": 2}

    resumed = _run_worker(tmp_path / "resumed", "freeze", "--epochs", "6", "--resume", str(checkpoint))
    for result in resumed:
        assert result["frozen"] == {"relu1": 1, "relu2": 2}
        assert not result["requires_grad"]["conv1.weight"]
        for name in ("conv1.weight", "conv1.bias", "bn1.weight", "conv2.weight"):
            assert result["checksums"][name] == first[0]["checksums"][name]
        epochs = [(r["epoch"], r["layer"], r["reference"], r["metric"]) for r in result["history"]]
        assert len(epochs) == len(set(epochs)), "history has duplicated rows after resume"
        assert {r["epoch"] for r in result["history"]} == set(range(7))
    assert resumed[0]["history"] == resumed[1]["history"]
