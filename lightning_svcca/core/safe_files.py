"""Reading and writing the monitor's own files without trusting the disk.

Every file the package reads back (snapshots, cross-layer moments, the HuggingFace state, the prefix cache's spill
files) is loaded with ``weights_only=True``: tensors and plain values only, so a crafted file cannot run code
(:func:`load_plain`). A file that cannot be read, for whatever reason (refused objects, truncated, empty,
corrupted), raises :class:`UnreadableFileError` naming it; a snapshot's contents are checked too
(:func:`load_snapshot_state`), so damaged bytes that still unpickle are caught before they reach a decomposition.
Writes go to a temporary ``.partial`` file renamed into place (:func:`save_atomically`), which is removed when
the write fails; :func:`try_write` turns a failed write (disk full, read-only folder, quota) into one warning per
folder, so training goes on. :func:`linked_folder` finds a symbolic link on the way from the log folder to a folder
the package would write in (a link planted in a shared log folder would send the files anywhere).
"""

from __future__ import annotations

import errno
import os
import pickle
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_svcca.measures import SimilarityWarning

__all__ = [
    "FileTrustWarning",
    "UnreadableFileError",
    "load_plain",
    "linked_folder",
    "load_snapshot_state",
    "report_unreadable",
    "save_atomically",
    "snapshot_problem",
    "stored_snapshot",
    "try_write",
]

T = TypeVar("T")

#: How far from 1 a stored basis column's norm may be before the file counts as damaged (float32 storage keeps
#: it within about 1e-5).
_NORM_TOLERANCE = 1e-2


class FileTrustWarning(SimilarityWarning):
    """A file of the run could not be read or written; the run goes on without it."""


class UnreadableFileError(ValueError):
    """A file that cannot be loaded as plain tensors and values (refused, truncated, empty or corrupted).

    Attributes:
        path: the file.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path = Path(path)


def load_plain(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with every failure as :class:`UnreadableFileError`.

    Raises:
        UnreadableFileError: the file holds objects other than tensors and plain values (refused: unpickling
            them could run code), or it is empty, truncated or corrupted, or cannot be opened.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnreadableFileError(
            path,
            "it holds objects other than tensors and plain values, which are refused (loading them could run code)"
            f" [{first_line[:200]}]",
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError) as error:
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UnreadableFileError(path, f"the file is damaged or not a torch file ({detail})") from error


def load_snapshot_state(path: str | Path, *, mmap: bool = True) -> dict[str, Any]:
    """A snapshot file's state (see ``Snapshot.to_state``), checked: shapes agree, values finite, bases unit.

    Raises:
        UnreadableFileError: the file cannot be loaded, or its contents are not a sound snapshot.
    """
    state = load_plain(path, mmap=mmap)
    problem = snapshot_problem(state)
    if problem is not None:
        raise UnreadableFileError(path, f"not a sound snapshot: {problem}")
    return state


def snapshot_problem(state: Any) -> str | None:
    """What is wrong with a snapshot state (``Snapshot.to_state``), or ``None`` when it is sound."""
    if not isinstance(state, Mapping):
        return f"a {type(state).__name__}, not a dict"
    left, values, right = state.get("left"), state.get("singular_values"), state.get("right")
    if not isinstance(left, Tensor) or left.ndim != 2 or not left.is_floating_point():
        return "no 2-D floating basis 'left'"
    if not isinstance(values, Tensor) or values.shape != (left.shape[1],):
        return "singular values do not match the basis"
    counts = [state.get(name) for name in ("kept", "rank", "n_features")]
    if not all(isinstance(count, int) and 0 <= count < 1 << 40 for count in counts):
        return f"kept/rank/n_features are not non-negative integers: {counts}"
    if right is not None and (not isinstance(right, Tensor) or right.shape != (counts[2], left.shape[1])):
        return "right singular vectors do not match the basis"
    if not bool(torch.isfinite(left).all()) or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        return "non-finite or negative values"
    norms = left.double().square().sum(0)
    if left.shape[1] and float((norms - 1).abs().max()) > _NORM_TOLERANCE:
        return "the basis columns are not unit vectors (damaged data)"
    return None


def stored_snapshot(store: Any, key: tuple[str, str]) -> Any:
    """``store.get(key)``, or ``None`` when the store has no readable snapshot under ``key``.

    A snapshot store drops (and reports once) a file it cannot read, then raises ``KeyError``: the comparisons
    that needed it are skipped.
    """
    if key not in store:
        return None
    try:
        return store.get(key)
    except KeyError:
        return None


def report_unreadable(error: UnreadableFileError, what: str) -> None:
    """Warn that a file was dropped because it cannot be read (``what``: e.g. the layer and epoch)."""
    warnings.warn(
        f"{what}: {error}. The file is dropped and comparisons needing it are skipped; training goes on",
        FileTrustWarning,
        stacklevel=3,
    )


def linked_folder(root: Path, folder: Path) -> Path | None:
    """The first symbolic link among ``folder`` and its parents below ``root`` (``None``: none, or not below it).

    ``root`` itself (the log folder the user chose) may be a link; what is planted inside it may not. Folders that do
    not exist yet are not links.
    """
    try:
        parts = folder.relative_to(root).parts
    except ValueError:
        return None
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            return path
    return None


def save_atomically(value: Any, path: str | Path) -> Path:
    """``torch.save`` to a unique ``.partial`` file beside ``path``, then rename it into place.

    Readers see the old file or the new one, never half of one; a failed write removes its ``.partial`` file and
    raises ``OSError`` (torch reports a full disk as a ``RuntimeError`` from its zip writer: it is turned into one).
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        try:
            torch.save(value, partial)
        except RuntimeError as error:
            raise OSError(errno.EIO, f"writing {partial.name} failed: {str(error).strip()[:200]}") from error
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)  # only left when the write failed
    return path


def try_write(write: Callable[..., T], *args: Any, where: Path, warned: set[Path], **kwargs: Any) -> T | None:
    """``write(*args, **kwargs)``; on an ``OSError`` (disk full, read-only, quota) warn once per ``where``.

    Args:
        write: the function that writes (and returns what the caller keeps, e.g. the file's path).
        *args: its arguments.
        where: the folder or file written, named in the warning.
        warned: folders already warned about (the caller's set; a success removes ``where`` from it).
        **kwargs: its keyword arguments.

    Returns:
        what ``write`` returned, or ``None`` when it failed.
    """
    try:
        result = write(*args, **kwargs)
    except OSError as error:
        if where not in warned:
            warned.add(where)
            warnings.warn(
                f"cannot write to {where} ({error.strerror or error}); what it would hold stays in memory and in"
                " the checkpoint, the write is tried again later, and training goes on",
                FileTrustWarning,
                stacklevel=3,
            )
        return None
    warned.discard(where)
    return result
