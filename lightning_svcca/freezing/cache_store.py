"""Where the prefix cache keeps its outputs: one row per sample key, in host memory up to a budget, then in files.

:class:`SampleStore` holds each sample's boundary output on the CPU while the memory budget allows; beyond it,
the rows of a batch are written together to one file in a directory created at the first spill and read back
memory-mapped. :meth:`SampleStore.close` deletes the directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_svcca.pipeline.safe_files import load_plain, save_atomically

__all__ = ["SampleStore"]


class SampleStore:
    """Cached output rows by sample key: in memory up to ``max_bytes``, then spilled to files.

    Args:
        max_bytes: host memory for rows (``None``: unbounded).
        spill_dir: called once, at the first spill, for the directory to write to.
    """

    def __init__(self, max_bytes: int | None, spill_dir: Callable[[], Path]) -> None:
        self.max_bytes = max_bytes
        #: Spill files in the order written; a spilled key points at (file index, row).
        self.files: list[Path] = []
        #: The directory of the spill files (``None`` before the first spill and after :meth:`close`).
        self.spill_dir: Path | None = None
        self._spill_dir_factory = spill_dir
        self._memory: dict[bytes, Tensor] = {}
        self._memory_bytes = 0
        self._spilled: dict[bytes, tuple[int, int]] = {}
        self._mapped: dict[int, Tensor] = {}

    @property
    def memory_bytes(self) -> int:
        """Bytes of rows held in memory."""
        return self._memory_bytes

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def __contains__(self, key: bytes) -> bool:
        return key in self._memory or key in self._spilled

    def store(self, keys: Sequence[bytes], outputs: Tensor) -> None:
        """Keep row ``i`` of ``outputs`` under ``keys[i]`` (keys already held are left as they are)."""
        rows = outputs.to("cpu")
        spill = []
        for index, key in enumerate(keys):
            if key in self:
                continue
            row = rows[index].clone()
            size = row.numel() * row.element_size()
            if self.max_bytes is None or self._memory_bytes + size <= self.max_bytes:
                self._memory[key] = row
                self._memory_bytes += size
            else:
                spill.append((key, index))
        if spill:
            self._spill([key for key, _ in spill], rows[[index for _, index in spill]].clone())

    def gather(self, keys: Sequence[bytes], device: torch.device) -> Tensor:
        """The rows of ``keys`` stacked in order, on ``device`` (every key must be held)."""
        rows = []
        for key in keys:
            row = self._memory.get(key)
            if row is None:
                file_index, index = self._spilled[key]
                if file_index not in self._mapped:
                    self._mapped[file_index] = load_plain(self.files[file_index], mmap=True)
                row = self._mapped[file_index][index]
            rows.append(row)
        stacked = torch.stack(rows)
        return stacked.to(device, non_blocking=True) if stacked.device != device else stacked

    def forget(self, keys: Sequence[bytes]) -> None:
        """Drop the rows of ``keys`` (rows spilled to a file stay there until :meth:`close`)."""
        for key in keys:
            row = self._memory.pop(key, None)
            if row is not None:
                self._memory_bytes -= row.numel() * row.element_size()
            self._spilled.pop(key, None)

    def close(self) -> None:
        """Drop every row and delete the spill files."""
        self._memory.clear()
        self._spilled.clear()
        self._mapped.clear()
        self._memory_bytes = 0
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None
        self.files.clear()

    def _spill(self, keys: list[bytes], rows: Tensor) -> None:
        """Write ``rows`` to a new file in the spill directory and index ``keys`` into it."""
        if self.spill_dir is None:
            self.spill_dir = self._spill_dir_factory()
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        file_index = len(self.files)
        path = self.spill_dir / f"prefix_{file_index:06d}.pt"
        save_atomically(rows, path)
        self.files.append(path)
        for row, key in enumerate(keys):
            self._spilled[key] = (file_index, row)
