"""The README is a front door: the setup commands first, then an example on the reader's own model that runs as
written, all within its first 50 lines; the test command is what ``.ci/run`` runs; at most 300 lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = list(re.finditer(r"^```(\w*)\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL))


def _last_line(match: re.Match[str]) -> int:
    return README[: match.end()].count("\n") + 1


def test_setup_commands_come_first_and_ci_runs_the_test_command() -> None:
    language, body = BLOCKS[0].groups()
    demo, tests = body.strip().splitlines()
    assert language == "bash" and _last_line(BLOCKS[0]) < 15
    assert demo.endswith("&& python examples/digits_convergence.py")  # CI's tooling runs the first command
    install, pytest_command = tests.split(" && ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and pytest_command in ci
    assert ci.index(install) < ci.index(pytest_command)


def test_at_most_300_lines() -> None:
    assert README.count("\n") <= 300


@pytest.mark.slow
def test_the_first_example_is_within_50_lines_and_runs_as_written(tmp_path: Path) -> None:
    example = next(match for match in BLOCKS if match.group(1) == "python")
    assert _last_line(example) <= 50
    script = tmp_path / "readme_example.py"
    script.write_text(example.group(2))
    completed = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert re.fullmatch(r"\{.*\}", lines[-3])  # callback.frozen
    for line, layer in zip(lines[-2:], ("net.1", "net.3"), strict=True):
        values = [float(v) for v in re.fullmatch(rf"{layer} \[(.*)\]", line).group(1).split(", ")]
        assert len(values) == 11 and values[-1] == 1.0 and all(0.0 <= v <= 1.0 for v in values)
    assert list((tmp_path / "runs" / "quickstart").rglob("svcca_history.csv"))
