"""What a killed process left in its run's folders, removed when the run resumes.

A process killed while it wrote (SIGKILL, power loss) leaves ``.partial`` files (atomic writes not yet renamed
into place, :mod:`~lightning_svcca.core.safe_files`) and, with the frozen-prefix cache, whole
``prefix_cache_*`` spill folders, as large as the cached activations. Nothing reads them again. When a run
resumes, :func:`clean_leftovers` deletes those in its own snapshot folder and the partial files of its own history
CSV, skipping any whose writer (the process id in a ``.partial`` name) is still alive, and says what it removed,
with the bytes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["clean_leftovers"]


def clean_leftovers(run_folder: Path, log_dir: Path, csv_name: str | None) -> tuple[list[Path], int]:
    """Delete a killed process's leftovers of this run; the paths removed and their bytes.

    Args:
        run_folder: the run's snapshot folder (``svcca_snapshots/<run_id>``): its ``prefix_cache_*`` folders and
            ``*.partial`` files.
        log_dir: the log folder: the ``<csv_name>.*.partial`` files of the run's history (and cross-layer) CSV.
        csv_name: the run's history file name (``None``: none claimed yet).
    """
    found: list[Path] = []
    if run_folder.is_dir() and not run_folder.is_symlink():
        found += [path for path in run_folder.glob("prefix_cache_*") if path.is_dir() and not path.is_symlink()]
        found += [path for path in run_folder.glob("*.partial") if _abandoned(path)]
    if csv_name is not None and log_dir.is_dir():
        for name in (csv_name, csv_name.replace("history", "cross_layer")):
            found += [path for path in log_dir.glob(f"{name}.*.partial") if _abandoned(path)]
    removed, size = [], 0
    for path in found:
        bytes_here = _size(path)
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
        size += bytes_here
    return removed, size


def _abandoned(path: Path) -> bool:
    """A ``.partial`` file whose writer is gone (its name holds the writer's id: ``name.<pid>.<id>.partial``)."""
    if not path.is_file() or path.is_symlink():
        return False
    parts = path.name.split(".")
    pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
    if pid is None or pid == os.getpid():
        return True  # this process writes nothing while it resumes
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())
