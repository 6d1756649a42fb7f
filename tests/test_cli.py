"""The lightning-svcca command on histories written the way the callback writes them, and on a real run's folder."""

from __future__ import annotations

import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

import lightning_svcca
from lightning_svcca.cli.main import main
from lightning_svcca.output.reporting import heatmap_image, heatmap_style, history_matrix, write_history_csv


def _rows(curves, reference="final", metric="svcca"):
    return [
        {"epoch": epoch, "layer": layer, "reference": reference, "metric": metric, "value": value}
        for layer, series in curves.items()
        for epoch, value in enumerate(series)
    ]


@pytest.fixture
def history_dir(tmp_path):
    # two layers; "low" reaches 0.9 at epoch 1 and stays, "high" only at epoch 3 (after a dip); "low" froze at 2
    rows = _rows({"low": [0.5, 0.92, 0.97, 1.0], "high": [0.3, 0.91, 0.6, 1.0]})
    rows += _rows({"low": [0.0, 0.0, 1.0, 1.0]}, reference="frozen")
    rows += _rows({"low": [12.0, 16.0, 16.0, 16.0], "high": [28.0, 30.0, 32.0, 31.0]}, reference="dims")
    write_history_csv(rows, tmp_path / "svcca_history.csv")
    return tmp_path


def _cka_only_rows():
    # what a run with metrics=("linear_cka",) holds: CKA similarities, and kept directions and freezes (whose
    # metric slot is "svcca")
    rows = _rows({"a": [0.4, 0.8, 1.0], "b": [0.2, 0.7, 1.0]}, reference="final", metric="linear_cka")
    rows += _rows({"a": [0.9, 0.99], "b": [0.8, 0.97]}, reference="previous", metric="linear_cka")
    for row in rows[-4:]:
        row["epoch"] += 1
    rows += _rows({"a": [5.0, 6.0, 6.0], "b": [9.0, 9.0, 8.0]}, reference="dims")
    return rows


def test_summary_prints_convergence_epochs_and_freezes(history_dir, capsys):
    assert main(["summary", str(history_dir), "--thresholds", "0.9", "0.95"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("svcca to final (layers bottom-up")
    assert lines[3].split() == ["low", "1", "2", "1.0000", "2"]
    assert lines[4].split() == ["high", "3", "3", "1.0000", "-"]


@pytest.mark.parametrize("level", ["1.5", "-2", "high"])
def test_summary_refuses_a_threshold_no_similarity_reaches(history_dir, capsys, level):
    with pytest.raises(SystemExit) as stopped:
        main(["summary", str(history_dir), "--thresholds", "0.9", level])
    assert stopped.value.code == 2 and "argument --thresholds" in capsys.readouterr().err


def test_table_and_heatmap(history_dir, capsys, tmp_path):
    assert main(["table", str(history_dir / "svcca_history.csv")]) == 0
    out = capsys.readouterr().out
    assert "0.920" in out and "0.600" in out
    assert main(["heatmap", str(history_dir), "--out", str(tmp_path / "map.png")]) == 0
    image = matplotlib.image.imread(tmp_path / "map.png")
    assert image.ndim == 3 and image.shape[2] in (3, 4)


def test_help_is_plain_text_and_version(capsys):
    for argv in (["--help"], ["summary", "--help"], ["table", "--help"], ["heatmap", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text and "HISTORY" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-svcca {lightning_svcca.__version__}"


def test_importing_the_cli_loads_neither_torch_nor_lightning_nor_matplotlib():
    code = (
        "import sys, lightning_svcca.cli.main; "
        "print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning', 'matplotlib') if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


def test_folder_search_uses_the_newest_history_or_each(tmp_path, capsys):
    # the folder handed to TensorBoard holds several runs: runs/<name>/version_<n>/svcca_history.csv
    old = write_history_csv(_rows({"x": [0.1, 0.2]}), tmp_path / "seed0" / "version_0" / "svcca_history.csv")
    new = write_history_csv(_rows({"y": [0.3, 0.4]}), tmp_path / "seed0" / "version_1" / "svcca_history.csv")
    os.utime(old, (1_000_000, 1_000_000))
    assert main(["table", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "y " in captured.out and "x " not in captured.out
    assert "2 histories" in captured.err and str(new) in captured.err
    assert main(["table", str(tmp_path / "seed0" / "version_0")]) == 0  # a run's own folder
    assert "x " in capsys.readouterr().out
    assert main(["summary", str(tmp_path), "--all"]) == 0
    out = capsys.readouterr().out
    assert out.index(f"== {old}") < out.index(f"== {new}")
    assert main(["heatmap", str(tmp_path), "--all", "--out", str(tmp_path / "maps" / "final.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "final-seed0-version_0.png",
        "final-seed0-version_1.png",
    ]


def test_missing_history_names_what_was_searched(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    assert main(["summary", str(tmp_path / "lightning_logs")]) == 2
    err = capsys.readouterr().err
    assert f"no svcca_history.csv in {tmp_path / 'lightning_logs'} or its subfolders" in err
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert main(["summary", str(tmp_path / "other.csv")]) == 2
    assert "is not a history file" in capsys.readouterr().err


def test_unknown_reference_lists_what_the_history_holds(history_dir, capsys):
    assert main(["summary", str(history_dir), "--reference", "initial"]) == 1
    err = capsys.readouterr().err
    assert "no rows for reference 'initial'" in err and "--metric svcca --reference final" in err


@pytest.mark.parametrize("command", ["summary", "table", "heatmap"])
def test_defaults_come_from_the_history(tmp_path, capsys, command):
    # a CKA-only run: the default metric is linear_cka (the svcca slot only holds directions kept)
    write_history_csv(_cka_only_rows(), tmp_path / "svcca_history.csv")
    extra = ["--out", str(tmp_path / "map.png")] if command == "heatmap" else []
    assert main([command, str(tmp_path), *extra]) == 0
    assert "linear_cka to final" in capsys.readouterr().out
    assert main([command, str(tmp_path), "--reference", "previous", *extra]) == 0
    assert "linear_cka to previous" in capsys.readouterr().out
    # a run with only the previous reference: that is the default
    write_history_csv(_rows({"a": [0.5, 0.9]}, reference="previous"), tmp_path / "svcca_history.csv")
    assert main([command, str(tmp_path), *extra]) == 0
    assert "svcca to previous" in capsys.readouterr().out


def test_a_metric_without_similarities_is_refused_clearly(tmp_path, capsys):
    write_history_csv(_cka_only_rows(), tmp_path / "svcca_history.csv")
    assert main(["summary", str(tmp_path), "--metric", "svcca"]) == 1
    assert "no rows for metric 'svcca' as a similarity" in capsys.readouterr().err


def test_dims_reports(history_dir, capsys, tmp_path):
    assert main(["summary", str(history_dir), "--reference", "dims"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "directions kept by svcca (layers bottom-up)"
    assert lines[3].split() == ["low", "12", "12", "16", "16", "2"]  # first, min, max, last, frozen at
    assert lines[4].split() == ["high", "28", "28", "32", "31", "-"]
    assert main(["table", str(history_dir), "--reference", "dims"]) == 0
    assert capsys.readouterr().out.splitlines()[4].split() == ["high", "28", "30", "32", "31"]
    out = tmp_path / "dims.png"
    assert main(["heatmap", str(history_dir), "--reference", "dims", "--out", str(out)]) == 0
    drawn = (matplotlib.image.imread(out)[..., :3] * 255).round()
    rows = [
        {"epoch": e, "layer": layer, "reference": "dims", "metric": "svcca", "value": v}
        for layer, series in {"low": [12.0, 16.0, 16.0, 16.0], "high": [28.0, 30.0, 32.0, 31.0]}.items()
        for e, v in enumerate(series)
    ]
    frozen = np.array([[False, False, True, True], [False] * 4])  # "low" froze at epoch 2: its cells hatched
    style = heatmap_style("svcca", "dims")
    expected = heatmap_image(*history_matrix(rows, "dims", "svcca"), **style, frozen=frozen)
    np.testing.assert_array_equal(drawn, expected)  # the linear scale of directions kept, not the similarity one


def test_installed_entry_point_runs(history_dir):
    completed = subprocess.run(
        [sys.executable, "-m", "lightning_svcca.cli", "summary", str(history_dir)], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    assert "svcca to final" in completed.stdout


@pytest.mark.filterwarnings("ignore::lightning_svcca.integrations.callback.SVCCAMonitorWarning")
@pytest.mark.filterwarnings("ignore::lightning_svcca.measures.TooFewDatapointsWarning")
@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
def test_a_real_cka_only_run_from_the_folder_given_to_tensorboard(
    tmp_path, capsys, digits, digits_loaders, digits_cnn, make_trainer
):
    import torch

    from lightning_svcca import SVCCACallback

    torch.manual_seed(0)
    callback = SVCCACallback(
        probe=digits[0][1000:1064],
        layers=["relu1", "relu2", "fc1"],
        reference=("previous", "final"),
        metrics=("linear_cka",),
        max_datapoints=256,
    )
    make_trainer([callback]).fit(digits_cnn(), *digits_loaders)
    capsys.readouterr()
    # tmp_path is the Trainer's default_root_dir; TensorBoard's logger writes under lightning_logs/version_0
    assert main(["summary", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("linear_cka to final")
    assert [line.split()[0] for line in lines[3:]] == ["relu1", "relu2", "fc1"]
    assert all(line.split()[-2] == "1.0000" for line in lines[3:])  # the last epoch against itself
    assert main(["heatmap", str(tmp_path), "--reference", "dims", "--out", str(tmp_path / "dims.png")]) == 0
    assert "3 layers x 3 epochs" in capsys.readouterr().out
    assert main(["table", str(tmp_path), "--reference", "previous"]) == 0
    assert "linear_cka to previous" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::lightning_svcca.measures.TooFewDatapointsWarning")
@pytest.mark.filterwarnings("ignore::lightning_svcca.SVCCAMonitorWarning")
@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
def test_a_real_run_by_steps_reports_every_measurement_by_step(
    tmp_path, capsys, digits, digits_loaders, digits_cnn, make_trainer
):
    """Measured every 2 steps of 4-batch epochs up to step 10: six measurements whose epochs collide (0, 0, 1, 1,
    2, 2). Keyed by epoch the reports showed three columns, each the last measurement of its epoch; by step, six."""
    import torch

    from lightning_svcca import SVCCACallback
    from lightning_svcca.output.reporting import read_history_csv

    torch.manual_seed(0)
    callback = SVCCACallback(
        probe=digits[0][1000:1128],
        layers=["relu1", "relu2", "fc1"],
        every_n_epochs=None,
        every_n_train_steps=2,
        max_datapoints=256,
    )
    make_trainer([callback], max_epochs=None, max_steps=10, limit_train_batches=4).fit(digits_cnn(), *digits_loaders)
    capsys.readouterr()
    (path,) = tmp_path.rglob("svcca_history.csv")
    final = [row for row in read_history_csv(path) if row["reference"] == "final" and row["layer"] == "relu1"]
    assert [(row["epoch"], row["step"]) for row in final] == [(0, 0), (0, 2), (1, 4), (1, 6), (2, 8), (2, 10)]

    assert main(["table", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["layer", "\\", "step", "0", "2", "4", "6", "8", "10"]
    relu1 = lines[3].split()
    assert relu1[0] == "relu1" and relu1[1:] == [f"{row['value']:.3f}" for row in final]
    assert main(["summary", str(tmp_path)]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert "first step from which" in summary[0] and summary[1].split()[-2:] == ["at", "(step)"]
    assert main(["heatmap", str(tmp_path), "--out", str(tmp_path / "final.png")]) == 0
    assert "3 layers x 6 steps" in capsys.readouterr().out


def test_old_freeze_rows_read_as_the_freeze_metric(history_dir, capsys):
    """Files written before freeze state had its own metric (``svcca``/``frozen``) read as ``freeze``/``frozen``."""
    from lightning_svcca.output.reporting import read_history_csv

    rows = read_history_csv(history_dir / "svcca_history.csv")
    assert {row["metric"] for row in rows if row["reference"] == "frozen"} == {"freeze"}
    assert main(["table", str(history_dir), "--reference", "frozen"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("frozen layers") and "svcca to frozen" not in out
    assert main(["table", str(history_dir), "--metric", "svcca", "--reference", "frozen"]) == 1
    assert "--metric freeze --reference frozen" in capsys.readouterr().err
