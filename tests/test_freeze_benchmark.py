"""The freeze benchmark's quick mode runs every variant; the scale-free rule's reference implementation decides."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _main(name: str, argv: list[str]) -> tuple[Any, Any]:
    """Load ``benchmarks/<name>.py`` with its folder importable and run its ``main(argv)``: (module, result)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = _load(name)
        return module, module.main(argv)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _rows(layer: str, totals: list[float], recents: dict[int, float]) -> list[dict]:
    """History rows of one layer: ``initial`` per epoch, and the lag rows the rule reads (the default lag)."""
    fraction = _load("freeze_rule_replay").LAG_FRACTION
    rows = []
    for epoch, total in enumerate(totals, start=1):
        lag = max(1, int(fraction * epoch + 0.5))
        rows.append({"epoch": epoch, "step": None, "layer": layer, "reference": "initial", "metric": "svcca",
                     "value": total})  # fmt: skip
        reference = "previous" if lag == 1 else f"lag{lag}"
        rows.append({"epoch": epoch, "step": None, "layer": layer, "reference": reference, "metric": "svcca",
                     "value": recents.get(epoch, total)})  # fmt: skip
    return rows


def test_scale_free_rule_freezes_a_settled_layer_bottom_up_and_not_a_moving_one():
    replay = _load("freeze_rule_replay")
    # "low" moved 0.1 in total and only 0.001 over the last quarter of the run at epochs 3 and 4: r = 0.01
    low = _rows("low", [0.95, 0.92, 0.9, 0.9], {3: 0.999, 4: 0.999})
    # "mid" moves as much recently as in total (r = 1), "top" is kept anyway
    mid = _rows("mid", [0.95, 0.92, 0.9, 0.9], {})
    rows = low + mid + _rows("top", [0.9] * 4, {3: 0.9999, 4: 0.9999})
    layers = ["low", "mid", "top"]
    assert replay.decide_scale_free(rows, layers, 2) == []  # epoch 2: still moving
    assert replay.decide_scale_free(rows, layers, 4) == ["low"]
    assert replay.decide_scale_free(rows, layers, 4, {"low": 4}) == []


def test_scale_free_rule_is_scale_free_and_passes_layers_that_never_moved():
    replay = _load("freeze_rule_replay")
    # adapters: a total movement of 2e-6 of which 2e-8 recently is as converged as 0.2 of which 0.002
    tiny = _rows("adapter", [1 - 1e-6, 1 - 2e-6, 1 - 2e-6, 1 - 2e-6], {3: 1 - 2e-8, 4: 1 - 2e-8})
    unmoved = _rows("embeddings", [1.0] * 4, {})
    rows = unmoved + tiny + _rows("head", [0.5] * 4, {})
    assert replay.decide_scale_free(rows, ["embeddings", "adapter", "head"], 4) == ["embeddings", "adapter"]
    moving = _rows("adapter", [1 - 1e-6, 1 - 2e-6, 1 - 3e-6, 1 - 4e-6], {})
    assert replay.decide_scale_free(unmoved + moving, ["embeddings", "adapter", "head"], 4) == ["embeddings"]


@pytest.mark.slow
def test_quick_mode_runs_every_variant(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SVCCA_BENCH_CACHE", str(tmp_path / "cache"))  # (e)'s quick pretraining, afresh
    module, results = _main(
        "freeze_benchmark", ["--quick", "--workloads", "b", "d", "e", "--threads", "1", "--root", str(tmp_path)]
    )
    assert set(results) == {"b", "d", "e"}
    assert list((tmp_path / "cache").glob("stdlib_bert-*/model.pt"))
    for variants in results.values():
        assert set(variants) == set(module.variants())
        assert all(len(runs) == 1 and runs[0].points for runs in variants.values())
    # the linear schedule freezes every layer but the head and the last stage, whose turn is the fit's end (held)
    assert set(results["b"]["linear schedule"][0].frozen) == {"stem", "stage1", "stage2"}
    table = capsys.readouterr().out
    assert "(b) from scratch, fixed inputs" in table and "(d) LoRA" in table and "time to acc" in table
    assert "(e) fine-tuning a small BERT pretrained (MLM) on the Python stdlib" in table


def test_stdlib_corpus_is_deterministic_and_its_task_splits_packages_by_file():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        corpus = _load("stdlib_corpus")
    finally:
        sys.path.remove(str(BENCHMARKS))
    files = corpus.stdlib_files()
    assert files == sorted(files, key=lambda path: path.as_posix()) and "os.py" in {path.as_posix() for path in files}
    assert not any(path.parts[0] in ("site-packages", "idlelib", "test") for path in files)
    assert corpus.tokenize("def f(x):\n    return x ** 2 # ok") == [
        "def", "f", "(", "x", ")", ":", "\n", "return", "x", "**", "2", "#", "ok",
    ]  # fmt: skip
    texts = [corpus.read(path) for path in corpus.pretraining_files()[::16]]
    vocabulary = corpus.Vocabulary.build(texts, 512)
    assert vocabulary.tokens == corpus.Vocabulary.build(reversed(texts), 512).tokens  # order-free, ties by text
    assert vocabulary.tokens[:4] == list(corpus.SPECIALS) and len(vocabulary) == 512
    (x, y), (test_x, test_y) = corpus.package_task(vocabulary, 80, 40)
    assert x.shape == (80, corpus.WINDOW) and test_x.shape == (40, corpus.WINDOW) and (x[:, 0] == corpus.CLS).all()
    assert y.bincount().tolist() == [10] * 8 and test_y.bincount().tolist() == [5] * 8
    again = corpus.package_task(vocabulary, 80, 40)
    assert torch.equal(again[0][0], x) and torch.equal(again[1][1], test_y)
    # no window of the test set occurs in the training set: they come from different files
    assert not ({tuple(row) for row in x.tolist()} & {tuple(row) for row in test_x.tolist()})


def test_replay_prints_its_table_from_the_committed_histories():
    replay = _load("freeze_rule_replay")
    table = replay.main([])
    assert all(f"({workload}) seed 0" in table for workload in "abcd")
    assert "movement f=0.25 th=0.75 p=1" in table


@pytest.mark.slow
def test_recording_quick_mode_writes_histories(tmp_path):
    recording = _load("freeze_recording")
    recording.main(["--quick", "--workloads", "d", "--out", str(tmp_path)])
    assert list(tmp_path.glob("*.json"))


def test_summary_of_a_partial_run_counts_only_seeds_whose_baseline_finished():
    summary = _load("freeze_summary")
    log = "\n".join([
        "# (c) seed 0 no callback: 20.0 s (18.0 s CPU), accuracy 70.00%, cached -, frozen -",
        "# (c) seed 0 FreezePolicy(): 12.0 s (12.0 s CPU), accuracy 69.80%, cached -, frozen bert.embeddings@5",
        "# (c) seed 1 FreezePolicy(): 11.0 s (11.0 s CPU), accuracy 60.00%, cached -, frozen -",
        "a line of something else",
    ])  # fmt: skip
    table = summary.summarise(log)
    assert "(c) seeds [0]" in table
    row = next(line for line in table.splitlines() if line.startswith("FreezePolicy()"))
    assert "1.50x" in row and "-0.20" in row and "embeddings@5" in row


@pytest.mark.slow
def test_oracle_quick_mode_fits_each_fixed_freeze(tmp_path, capsys):
    _, results = _main("freeze_oracle", ["--quick", "--workloads", "c", "--threads", "1"])
    runs = results["c"]
    # 3 quick epochs: the fractions round to epochs 1 and 2; "all" keeps only the head, "lower" also the top block
    assert set(runs) == {"no callback", "all@1 + cache", "lower@1 + cache", "all@2 + cache", "lower@2 + cache"}
    assert set(runs["all@2 + cache"][0].frozen.values()) == {2} and len(runs["all@2 + cache"][0].frozen) == 5
    assert len(runs["lower@1 + cache"][0].frozen) == 4 and not runs["no callback"][0].frozen
    assert "(c) fine-tuning a small BERT" in capsys.readouterr().out


def test_monitor_cost_quick_mode_splits_the_cost_of_each_probe_size(tmp_path, capsys):
    _, pairs = _main("monitor_cost", ["--quick", "--workloads", "d", "--probes", "16", "8"])
    assert set(pairs) == {("d", 16), ("d", 8)}
    for [(base, monitored)] in pairs.values():
        assert base.probe_seconds is None and 0 < monitored.probe_seconds < monitored.measuring_seconds
    table = capsys.readouterr().out
    assert "probe passes" in table and "(d)" in table


def test_rewind_quick_mode_prints_the_probe_loss_with_the_lower_layers_set_back(capsys):
    _, table = _main("freeze_rewind", ["--quick", "--workloads", "d", "--seeds", "0"])
    rows = table["d", 0]
    assert [row[0] for row in rows] == [1, 2, 3] and [row[2] for row in rows] == [1, 1, 2]  # epochs, lags
    assert all(loss > 0 and rewound > 0 for *_, loss, rewound in rows)
    assert "(d) seed 0: epoch, test accuracy, lag, probe loss, rewound, rise" in capsys.readouterr().out
