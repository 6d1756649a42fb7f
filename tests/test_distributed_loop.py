"""``examples/distributed_loop.py`` under ``torchrun`` (gloo, CPU): 1 process and 2 (DDP, FSDP2) agree.

Each configuration runs once per module (``--quick``: 4 epochs, freezes after epochs 1 and 2, a DCP checkpoint per
epoch), through ``python -m torch.distributed.run --standalone`` (a free port of its own). Rank zero writes
``summary.json``: freezes, per-epoch communication counts and a hash of every full parameter after each epoch.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from torchrun_example import run_example

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "distributed_loop.py"
FROZEN = {"act1": 1, "act2": 2}
FROZEN_PARAMETERS = {"fc1.weight": 1, "fc1.bias": 1, "fc2.weight": 2, "fc2.bias": 2}
#: Parameters per layer of the example's MLP (32 -> 64 -> 64 -> 64 -> 4) and its steps per epoch (512 / 64).
NUMEL = {"fc1": 32 * 64 + 64, "fc2": 64 * 64 + 64, "fc3": 64 * 64 + 64, "head": 64 * 4 + 4}
STEPS = 8

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def _torchrun(out: Path, processes: int, *args: str) -> dict:
    """Run the example; rank zero's summary, with the history CSV's rows."""
    summary = run_example(EXAMPLE, out, processes, *args)
    with (out / summary["csv"]).open() as handle:
        summary["history"] = list(csv.DictReader(handle))
    return summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One process (unsharded), 2 with DDP, 2 with FSDP2, and FSDP2 resumed from its epoch-2 checkpoint."""
    root = tmp_path_factory.mktemp("distributed_loop")
    results = {
        "single": _torchrun(root / "single", 1),
        "ddp": _torchrun(root / "ddp", 2, "--strategy", "ddp"),
        "fsdp2": _torchrun(root / "fsdp2", 2, "--strategy", "fsdp2"),
    }
    resume = root / "fsdp2" / "checkpoints" / "epoch-2"
    results["resumed"] = _torchrun(root / "resumed", 2, "--strategy", "fsdp2", "--resume", str(resume))
    for name, result in results.items():
        result["dir"] = root / name
    return results


def _values(history: list[dict]) -> dict[tuple, float]:
    return {(r["epoch"], r["layer"], r["reference"], r["metric"]): float(r["value"]) for r in history}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_measure_and_freeze_as_one(runs, strategy):
    """Epoch 0 (the same seeded weights) within 1e-5; later epochs within rounding; the same freezes."""
    single, sharded = runs["single"], runs[strategy]
    assert (single["world_size"], sharded["world_size"], sharded["strategy"]) == (1, 2, strategy)
    expected, got = _values(single["history"]), _values(sharded["history"])
    assert got.keys() == expected.keys()
    assert {reference for _, _, reference, _ in expected} >= {"previous", "initial", "baseline", "frozen"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5 if key[0] == "0" else 1e-4), key
    frozen_rows = {key: value for key, value in got.items() if key[2] == "frozen"}
    assert frozen_rows == {key: value for key, value in expected.items() if key[2] == "frozen"}
    assert single["frozen"] == sharded["frozen"] == FROZEN
    assert not any(sharded["requires_grad"][name] for name in FROZEN_PARAMETERS)


@pytest.mark.parametrize("name", ["single", "ddp", "fsdp2"])
def test_frozen_parameters_keep_their_values_bit_for_bit(runs, name):
    """A frozen parameter's full value hashes the same from its freeze epoch to the end; trained ones move."""
    hashes = runs[name]["hashes"]
    for parameter, epoch in FROZEN_PARAMETERS.items():
        assert len({hashes[str(later)][parameter] for later in range(epoch, 5)}) == 1, parameter
    assert len({hashes[str(epoch)]["head.weight"] for epoch in range(1, 5)}) == 4


def test_fsdp2_freeze_skips_the_frozen_blocks_reduce_scatters(runs):
    """Per step: one reduce-scatter per fully_shard-ed Linear that trains; a frozen one sends nothing."""
    counters = runs["fsdp2"]["counters"]
    trained = {1: ["fc1", "fc2", "fc3", "head"], 2: ["fc2", "fc3", "head"], 3: ["fc3", "head"], 4: ["fc3", "head"]}
    for epoch, layers in trained.items():
        assert counters[str(epoch)]["reduce_scatters"] == STEPS * len(layers)
        assert counters[str(epoch)]["reduce_scatter_elements"] == STEPS * sum(NUMEL[layer] for layer in layers)


def test_ddp_rewrap_stops_reducing_frozen_gradients(runs):
    """After each freeze DDP is wrapped again around the trainable parameters: fewer elements all-reduced."""
    counters = runs["ddp"]["counters"]
    elements = [counters[str(epoch)]["all_reduce_elements"] / STEPS for epoch in range(1, 5)]
    trained = NUMEL["fc3"] + NUMEL["head"]
    assert elements == [sum(NUMEL.values()), sum(NUMEL.values()) - NUMEL["fc1"], trained, trained]


def test_fsdp2_resume_from_a_dcp_checkpoint_continues_identically(runs):
    """Resumed at epoch 2 (DCP model and optimizer, the monitor's state): same weights, history and freezes."""
    first, resumed = runs["fsdp2"], runs["resumed"]
    assert resumed["frozen"] == FROZEN
    assert resumed["history"] == first["history"]
    for epoch in ("3", "4"):
        assert resumed["hashes"][epoch] == first["hashes"][epoch]
    assert resumed["counters"]["3"]["reduce_scatters"] == STEPS * 2
    state = torch.load(first["dir"] / "checkpoints" / "epoch-2" / "svcca_monitor.pt", weights_only=True)
    assert state["frozen"] == FROZEN


@pytest.mark.parametrize("name", ["single", "ddp", "fsdp2", "resumed"])
def test_only_rank_zero_writes(runs, name):
    """One snapshot folder and one history CSV per run; the monitor's state once per checkpoint."""
    folder = runs[name]["dir"]
    assert [path.name for path in folder.glob("svcca_history*.csv")] == ["svcca_history.csv"]
    snapshot_folders = list((folder / "svcca_snapshots").iterdir())
    assert len(snapshot_folders) == 1 and any(snapshot_folders[0].iterdir())
    for checkpoint in (folder / "checkpoints").iterdir():
        assert len(list(checkpoint.glob("svcca_monitor*"))) == 1
