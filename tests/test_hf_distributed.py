"""``examples/hf_trainer_distributed.py`` under ``torchrun`` (gloo, CPU): the HF Trainer on 1 and 2 processes agrees.

Each configuration runs once per module (``--quick``: 4 epochs of 8 steps, freezes after epochs 1 and 2, a
checkpoint folder per epoch), through ``python -m torch.distributed.run --standalone``: 1 process, 2 processes, and
2 processes resumed from the 2-process run's ``checkpoint-16`` (after epoch 2). The Trainer wraps the model in DDP
with ``ddp_find_unused_parameters=False`` (also on one process under ``torchrun``), so training on after a freeze
needs the callback's reducer rebuild. Rank zero writes ``summary.json``: the freezes, and per process the parameters'
``requires_grad``, their hashes after each epoch and the elements DDP's reducer all-reduces per step.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

from torchrun_example import run_example

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_trainer_distributed.py"
FROZEN = {"act1": 1, "act2": 2}
FROZEN_PARAMETERS = {"fc1.weight": 1, "fc1.bias": 1, "fc2.weight": 2, "fc2.bias": 2}
#: The trainable parameters' elements at the end (fc3: 64 x 64 + 64, head: 64 x 4 + 4).
TRAINED_ELEMENTS = 4160 + 260

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def _torchrun(out: Path, processes: int, *args: str) -> dict:
    """Run the example; rank zero's summary, with the history CSV's rows."""
    summary = run_example(EXAMPLE, out, processes, *args)
    with (out / "svcca_history.csv").open() as handle:
        summary["history"] = list(csv.DictReader(handle))
    summary["dir"] = out
    return summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One process, two, and two resumed from the two-process run's checkpoint after epoch 2."""
    root = tmp_path_factory.mktemp("hf_distributed")
    results = {"single": _torchrun(root / "single", 1), "ddp": _torchrun(root / "ddp", 2)}
    # the resumed run's folder: the checkpoint and the run's snapshots (its "initial" reference), nothing else
    for name in ("checkpoint-16", "svcca_snapshots"):
        shutil.copytree(root / "ddp" / name, root / "resumed" / name)
    results["resumed"] = _torchrun(root / "resumed", 2, "--resume", str(root / "resumed" / "checkpoint-16"))
    return results


def _values(history: list[dict]) -> dict[tuple, float]:
    return {(r["epoch"], r["layer"], r["reference"], r["metric"]): float(r["value"]) for r in history}


def test_two_processes_measure_and_freeze_as_one(runs):
    """Epoch 0 (the same seeded weights) within 1e-5; later epochs within rounding; the same freezes."""
    single, ddp = runs["single"], runs["ddp"]
    assert (single["world_size"], ddp["world_size"], len(ddp["ranks"])) == (1, 2, 2)
    expected, got = _values(single["history"]), _values(ddp["history"])
    assert got.keys() == expected.keys()
    assert {reference for _, _, reference, _ in expected} >= {"previous", "initial", "frozen"}
    assert {epoch for epoch, *_ in expected} == {"0", "1", "2", "3", "4"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5 if key[0] == "0" else 1e-4), key
    assert single["frozen"] == ddp["frozen"] == FROZEN


@pytest.mark.parametrize("name", ["single", "ddp", "resumed"])
def test_every_rank_freezes_the_same_parameters_and_ddp_reduces_only_the_rest(runs, name):
    """``requires_grad`` is the same on every rank; DDP's reducer, rebuilt after each freeze, skips the frozen."""
    ranks = runs[name]["ranks"]
    assert all(rank["requires_grad"] == ranks[0]["requires_grad"] for rank in ranks)
    assert {parameter for parameter, trains in ranks[0]["requires_grad"].items() if not trains} == set(
        FROZEN_PARAMETERS
    )
    assert [rank["reduced_elements"] for rank in ranks] == [TRAINED_ELEMENTS] * len(ranks)


@pytest.mark.parametrize("name", ["single", "ddp"])
def test_frozen_parameters_keep_their_values(runs, name):
    """Every rank holds the same weights; a frozen parameter's hash stays from its freeze epoch; trained ones move."""
    ranks = runs[name]["ranks"]
    assert all(rank["hashes"] == ranks[0]["hashes"] for rank in ranks)
    hashes = ranks[0]["hashes"]
    for parameter, epoch in FROZEN_PARAMETERS.items():
        assert len({hashes[str(later)][parameter] for later in range(epoch, 5)}) == 1, parameter
    assert len({hashes[str(epoch)]["head.weight"] for epoch in range(1, 5)}) == 4


def test_resume_from_a_checkpoint_folder_continues_the_history(runs):
    """Resumed after epoch 2 on 2 processes (freezes restored before the first step): the same history and weights."""
    first, resumed = runs["ddp"], runs["resumed"]
    assert resumed["frozen"] == FROZEN
    assert resumed["history"] == first["history"]
    for epoch in ("3", "4"):
        assert resumed["ranks"][0]["hashes"][epoch] == first["ranks"][0]["hashes"][epoch]


@pytest.mark.parametrize("name", ["ddp", "resumed"])
def test_only_rank_zero_writes(runs, name):
    """One history CSV, one snapshot folder and one TensorBoard events file per run; the state once a checkpoint."""
    folder = runs[name]["dir"]
    assert [path.name for path in folder.glob("svcca_history*.csv")] == ["svcca_history.csv"]
    snapshot_folders = list((folder / "svcca_snapshots").iterdir())
    assert len(snapshot_folders) == 1 and any(snapshot_folders[0].iterdir())
    events = folder / "runs" / "svcca" / ("resumed_step16" if name == "resumed" else "")  # a resumed run's own
    assert len(list(events.glob("events.out.tfevents.*"))) == 1
    steps = {"ddp": [8, 16, 24, 32], "resumed": [16, 24, 32]}[name]  # the resumed run began with checkpoint-16
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert [path.name for path in checkpoints] == [f"checkpoint-{step}" for step in steps]
    for checkpoint in checkpoints:
        assert [path.name for path in checkpoint.glob("svcca_state*")] == ["svcca_state.pt"]
