"""The command line on hostile inputs: bounded memory, one line on stderr and status 2, never a traceback; a
pipe closed early ends it quietly; ``--model`` finds a module in the current directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_svcca.cli.main import main
from lightning_svcca.output.reporting import write_history_csv

ROOT = Path(__file__).resolve().parents[1]


class PlainNet(nn.Sequential):
    """A model ``compare`` can build without arguments."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _one_line_error(capsys: pytest.CaptureFixture, status: int) -> str:
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert error.startswith("lightning-svcca: error: ")
    return error


def _compare(tmp_path: Path, checkpoint: Path, *extra: str) -> int:
    torch.save(torch.randn(16, 4), tmp_path / "probe.pt")
    good = tmp_path / "good.pt"
    torch.save(PlainNet().state_dict(), good)
    spec = f"{__name__}:PlainNet"
    return main(["compare", str(checkpoint), str(good), "--model", spec, "--probe", str(tmp_path / "probe.pt"), *extra])


def test_a_deflate_bomb_checkpoint_is_refused_before_it_is_inflated(tmp_path: Path, capsys) -> None:
    """A real checkpoint's zip with a deflated member of zeros: 64 MiB from about 64 KB, refused by its sizes."""
    bomb = tmp_path / "bomb.pt"
    torch.save(PlainNet().state_dict(), bomb)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data/99", b"\0" * 64 * 2**20)
    assert bomb.stat().st_size < 2**20
    error = _one_line_error(capsys, _compare(tmp_path, bomb))
    assert "bomb.pt" in error and "inflates" in error and "refused" in error


def test_a_checkpoint_past_the_memory_limit_is_refused_with_the_option(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "a.pt"
    torch.save(PlainNet().state_dict(), checkpoint)
    error = _one_line_error(capsys, _compare(tmp_path, checkpoint, "--max-bytes", "100"))
    assert "a.pt" in error and "--max-bytes" in error
    assert _compare(tmp_path, checkpoint) == 0  # within the default limit it loads
    capsys.readouterr()


@pytest.mark.parametrize(
    "content",
    [b"", b"not a torch file at all", b"PK\x03\x04" + os.urandom(200), b"\x80\x02" + os.urandom(64)],
    ids=["empty", "text", "damaged-zip", "damaged-pickle"],
)
def test_damaged_checkpoints_give_one_line(tmp_path: Path, capsys, content: bytes) -> None:
    checkpoint = tmp_path / "bad.pt"
    checkpoint.write_bytes(content)
    assert "bad.pt" in _one_line_error(capsys, _compare(tmp_path, checkpoint))


def test_a_state_dict_of_another_model_gives_one_line(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "other.pt"
    torch.save({"weight": torch.randn(3, 3)}, checkpoint)
    _one_line_error(capsys, _compare(tmp_path, checkpoint))


def test_a_huge_csv_cell_is_a_clear_error(tmp_path: Path, capsys) -> None:
    rows = [{"epoch": 0, "step": 0, "layer": "a" * 200_000, "reference": "final", "metric": "svcca", "value": 1.0}]
    write_history_csv(rows, tmp_path / "svcca_history.csv")
    error = _one_line_error(capsys, main(["table", str(tmp_path)]))
    assert "longer than 131072 characters" in error and "svcca_history.csv" in error


@pytest.mark.parametrize(
    "text",
    [
        "epoch,step,layer,reference,metric,value\nx,0,a,final,svcca,1\n",
        "epoch,step,layer,reference,metric,value\n0,0,a,final,svcca\n",
        "epoch,step,layer,reference,metric,value\n1e400,0,a,final,svcca,1\n",
        "\x00\x01\x02\nbinary\n",
        "a,b\n1,2\n",
    ],
    ids=["text-epoch", "short-row", "huge-number", "binary", "other-columns"],
)
def test_hostile_history_files_give_one_line(tmp_path: Path, capsys, text: str) -> None:
    (tmp_path / "svcca_history.csv").write_text(text)
    for command in ("summary", "table"):
        _one_line_error(capsys, main([command, str(tmp_path)]))


def test_table_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    rows = [
        {"epoch": epoch, "step": epoch, "layer": f"layer{layer}", "reference": "final", "metric": "svcca", "value": 0.5}
        for epoch in range(60)
        for layer in range(400)
    ]
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        write_history_csv(rows, tmp_path / run / "svcca_history.csv")
    command = f"{sys.executable} -m lightning_svcca.cli table --all {tmp_path} | head -n 3"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 3
    assert done.stderr == "", done.stderr


def test_model_module_is_found_in_the_current_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "my_local_models.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Sequential):\n    def __init__(self):\n"
        "        super().__init__(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
    )
    torch.save(PlainNet().state_dict(), tmp_path / "a.pt")
    torch.save(torch.randn(16, 4), tmp_path / "probe.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_local_models", raising=False)
    assert main(["compare", "a.pt", "a.pt", "--model", "my_local_models:Net", "--probe", "probe.pt"]) == 0
    assert "1.000" in capsys.readouterr().out
    status = main(["compare", "a.pt", "a.pt", "--model", "not_here_at_all:Net", "--probe", "probe.pt"])
    assert "cannot import 'not_here_at_all'" in _one_line_error(capsys, status)
