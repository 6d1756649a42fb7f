"""Every benchmark script runs end to end in its ``--quick`` mode and prints its table, so a broken one fails CI.

Each script is loaded as a module and its ``main(["--quick"])`` is called in this process (one interpreter start
for all of them); torch's thread count, the warning filters and ``sys.path`` / ``sys.modules`` are restored after
each. ``benchmarks/freeze_wallclock.py`` is run by ``tests/test_freeze_wallclock.py``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(capsys: pytest.CaptureFixture[str], script: str, *extra: str) -> tuple[object, list[str]]:
    """Run ``benchmarks/<script>.py --quick`` in this process; return what ``main`` returned and the printed lines."""
    path, modules = list(sys.path), set(sys.modules)
    threads = torch.get_num_threads()
    name = f"benchmark_{script}"
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        with warnings.catch_warnings():
            spec.loader.exec_module(module)
            result = module.main(["--quick", *extra])
    finally:
        sys.path[:] = path
        for added in set(sys.modules) - modules:  # the examples' and benchmarks' helpers, imported by name
            del sys.modules[added]
        torch.set_num_threads(threads)
    return result, capsys.readouterr().out.splitlines()


def table(lines: list[str], header: str) -> list[list[str]]:
    """The whitespace-split rows after the line whose first words are ``header``, up to a blank line.

    Lines of dashes are left out.
    """
    words = header.split()
    start = next(index for index, line in enumerate(lines) if line.split()[: len(words)] == words)
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        if set(line.strip()) != {"-"}:
            rows.append(line.split())
    return rows


def numbers(text: str) -> list[float]:
    return [float(value) for value in re.findall(r"-?\d+\.\d+", text)]


def test_final_pass(capsys):
    _, lines = run_quick(capsys, "final_pass")
    text = "\n".join(lines)
    assert "final pass over 4 epochs x 2 layers (8 pairs)" in text
    for label in ("from stored snapshots", "svcca pair by pair", "speed-up", "largest difference"):
        assert label in text
    difference = float(text.split("largest difference    :")[1].split()[0])
    assert difference < 1e-5  # the stored pass computes what svcca computes


def test_snapshot_memory(capsys):
    _, lines = run_quick(capsys, "snapshot_memory")
    rows = table(lines, "mode width kept")
    assert [(row[0], row[1]) for row in rows] == [("memory", "64"), ("memory", "128")] + [
        ("persistent", "64"),
        ("persistent", "128"),
    ]
    assert all(row[-1] == "yes" for row in rows)  # every snapshot read back intact, folders cleaned as promised
    assert all(float(row[6]) <= 1.0 for row in rows)  # the store never held more than its budget


def test_peers(capsys):
    _, lines = run_quick(capsys, "peers")
    rows = table(lines, "n d peer")
    # scipy is a test dependency; the other peers are skipped with a message when missing
    scipy = [row for row in rows if row[2] == "scipy"]
    assert scipy and scipy[0][3] == "cca" and float(scipy[0][6]) < 1e-10
    assert all(len(row) == 9 for row in rows)


def test_similarity(capsys):
    _, lines = run_quick(capsys, "similarity")
    rows = [[value for value in row if value != "(low-rank)"] for row in table(lines, "n d floor")]
    assert [row[-6] for row in rows] == ["svcca", "cca", "pwcca", "linear_cka"] * 4
    assert max(float(row[-1]) for row in rows) < 1e-6  # ours and the numpy implementations agree
    assert sum(line.startswith("target svcca") for line in lines) == 4


def test_measure_values(capsys):
    _, lines = run_quick(capsys, "measure_values")
    header, rule, *rows = [line for line in lines if line.startswith("|")]
    assert header.count("|") == 13 and rule.count("---") == 12
    assert len(rows) == 5 and all(len(numbers(row.split("|", 2)[2])) == 11 for row in rows)


@pytest.mark.slow
def test_long_run_prints_sizes_and_ratios(capsys):
    _, lines = run_quick(capsys, "long_run")
    rows = table(lines, "epoch ckpt")
    assert [row[0] for row in rows[:2]] == ["1", "3"]
    first, last = (list(map(float, row[1:])) for row in rows[:2])
    # ratios to the first row: 1.00 there, and the checkpoint ratio matches the printed sizes
    assert first[-4:] == [1.0, 1.0, 1.0, 1.0]
    assert last[-4] == pytest.approx(last[0] / first[0], abs=0.01)
    # a checkpoint holds at least the callback's state; measurements took time
    assert first[0] > first[1] > 0 and first[4] > 0


@pytest.mark.slow
def test_overhead(capsys):
    _, lines = run_quick(capsys, "overhead")
    text = "\n".join(lines)
    # the package's import loads none of the heavy dependencies
    assert re.search(r"import lightning_svcca :\s+\d+\.\d+ s .*heavy ones loaded: none\)", text), text
    for label in ("epoch without callback", "epoch with callback", "overhead ratio", "one measurement"):
        assert label in text
    assert "512 samples, probe 128, 6 layers" in text


@pytest.mark.slow
def test_freeze_training(capsys):
    _, lines = run_quick(capsys, "freeze_training")
    rows = table(lines, "setup variant")
    variants = ["no freezing", "linear schedule", "convergence (defaults)", "consecutive epochs"]
    assert [" ".join(row[2:-4]) for row in rows] == variants * 2
    assert [row[-3] for row in rows[::4]] == ["+0.000", "+0.000"]  # each setup's baseline against itself
    assert sum("conv layers frozen" in line for line in lines) == 4


@pytest.mark.slow
def test_precision_values(capsys):
    results, lines = run_quick(capsys, "precision_values")
    rows = [line for line in lines if line.startswith("| `")]
    assert len(rows) == 6 and all(len(numbers(row)) == 4 for row in rows)
    # bf16-mixed probes run in float32 by default: the values of a 32-true probe on the same weights
    assert results["`bf16-mixed` (default)"]["other"] == pytest.approx(results["`32-true`"]["other"], abs=1e-4)


@pytest.mark.slow
def test_sharded_probe(capsys):
    _, lines = run_quick(capsys, "sharded_probe")
    rows = table(lines, "rank probe pass")
    assert [(row[0], row[1]) for row in rows[:4]] == [("unsharded", "0"), ("unsharded", "1")] + [
        ("sharded", "0"),
        ("sharded", "1"),
    ]
    assert sum("sharded / unsharded" in line for line in lines) == 2


@pytest.mark.slow
def test_pretrain_stdlib_bert_caches_and_prints_its_loss_curve(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SVCCA_BENCH_CACHE", str(tmp_path))
    _, lines = run_quick(capsys, "pretrain_stdlib_bert")
    assert any(line.startswith("pretrained in") for line in lines)
    curve = numbers(next(line for line in lines if line.startswith("MLM loss by span")))
    assert curve[-1] < curve[0]  # the loss falls, even in 30 steps
    (directory,) = tmp_path.glob("stdlib_bert-*")
    weights = (directory / "model.pt").read_bytes()
    _, lines = run_quick(capsys, "pretrain_stdlib_bert")  # cached: not trained again
    assert any(line.startswith("cached in") for line in lines)
    _, lines = run_quick(capsys, "pretrain_stdlib_bert", "--force")  # trained again: the same weights
    assert (directory / "model.pt").read_bytes() == weights or _same_state(directory, weights)


def _same_state(directory: Path, weights: bytes) -> bool:
    import io

    saved = torch.load(io.BytesIO(weights), weights_only=True)
    again = torch.load(directory / "model.pt", weights_only=True)
    return all(torch.equal(saved[key], again[key]) for key in saved)


@pytest.mark.slow
def test_stdlib_transfer(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SVCCA_BENCH_CACHE", str(tmp_path))
    _, lines = run_quick(capsys, "stdlib_transfer")
    assert [line.split(",")[0] for line in lines if line.startswith("(e)")] == [
        "(e) pretrained encoder", "(e) random encoder",
    ]  # fmt: skip
