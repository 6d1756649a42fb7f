"""Where the prefix cache keeps its outputs: one row per sample key, in memory up to a budget, then in files.

:class:`SampleStore` holds each sample's boundary output in memory while the budget allows: first on the training
device up to ``device_bytes`` of it (no copy back at serving time), then in host memory; beyond the budget, the rows
of a batch are written together to one file in a directory created at the first spill and read back memory-mapped.
:meth:`SampleStore.close` deletes the directory. A spill that cannot be written (disk full, read-only,
permission denied, torch's zip writer failing) raises ``OSError`` with the folder named, and leaves no file behind:
the cache, an optional part, then turns itself off.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_svcca.core.safe_files import load_plain, save_atomically

__all__ = ["SampleStore"]

_HOST = torch.device("cpu")


class SampleStore:
    """Cached output rows by sample key: in memory up to ``max_bytes`` (on ``device`` first), then spilled to files.

    Args:
        max_bytes: memory for rows, device and host together (``None``: unbounded).
        spill_dir: called once, at the first spill, for the directory to write to.
        device: where the first ``device_bytes`` of rows are kept (``None``: host memory only).
        device_bytes: how much of ``max_bytes`` may sit on ``device``.
    """

    def __init__(
        self,
        max_bytes: int | None,
        spill_dir: Callable[[], Path],
        device: torch.device | None = None,
        device_bytes: int = 0,
    ) -> None:
        self.max_bytes = max_bytes
        self.device = device if device is not None and device != _HOST else None
        self.device_bytes = device_bytes if self.device is not None else 0
        #: Spill files in the order written; a spilled key points at (file index, row).
        self.files: list[Path] = []
        #: The directory of the spill files (``None`` before the first spill and after :meth:`close`).
        self.spill_dir: Path | None = None
        self._spill_dir_factory = spill_dir
        self._memory: dict[bytes, Tensor] = {}
        self._memory_bytes = 0
        self._on_device_bytes = 0
        self._spilled: dict[bytes, tuple[int, int]] = {}
        self._spilled_bytes = 0
        self._mapped: dict[int, Tensor] = {}

    @property
    def memory_bytes(self) -> int:
        """Bytes of rows held in memory (device and host)."""
        return self._memory_bytes

    @property
    def on_device_bytes(self) -> int:
        """Bytes of rows held on the training device."""
        return self._on_device_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes of rows held anywhere: memory and spill files."""
        return self._memory_bytes + self._spilled_bytes

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def __contains__(self, key: bytes) -> bool:
        return key in self._memory or key in self._spilled

    def store(self, keys: Sequence[bytes], outputs: Tensor) -> None:
        """Keep row ``i`` of ``outputs`` under ``keys[i]`` (keys already held are left as they are)."""
        fresh = {}
        for index, key in enumerate(keys):
            if key not in self and key not in fresh:
                fresh[key] = index
        if not fresh:
            return
        size = outputs[0].numel() * outputs.element_size()
        tiers: dict[str, list[tuple[bytes, int]]] = {"device": [], "host": [], "spill": []}
        for key, index in fresh.items():
            if self._on_device_bytes + size <= self.device_bytes and self._fits(size):
                tiers["device"].append((key, index))
                self._on_device_bytes += size
            elif self._fits(size):
                tiers["host"].append((key, index))
            else:
                tiers["spill"].append((key, index))
                continue
            self._memory_bytes += size
        for tier, device in (("device", self.device), ("host", _HOST)):
            if tiers[tier]:
                # one copy per batch; each row is a view of it (the copy holds only the rows kept here)
                rows = outputs[[index for _, index in tiers[tier]]].to(device, copy=True)
                self._memory.update((key, rows[row]) for row, (key, _) in enumerate(tiers[tier]))
        if tiers["spill"]:
            self._spill([key for key, _ in tiers["spill"]], outputs[[index for _, index in tiers["spill"]]].to(_HOST))

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
        if len({row.device for row in rows}) > 1:
            rows = [row.to(device, non_blocking=True) for row in rows]
        stacked = torch.stack(rows)
        return stacked.to(device, non_blocking=True) if stacked.device != device else stacked

    def forget(self, keys: Sequence[bytes]) -> None:
        """Drop the rows of ``keys`` (rows spilled to a file stay there until :meth:`close`)."""
        for key in keys:
            row = self._memory.pop(key, None)
            if row is not None:
                size = row.numel() * row.element_size()
                self._memory_bytes -= size
                if row.device != _HOST:
                    self._on_device_bytes -= size
            self._spilled.pop(key, None)

    def close(self) -> None:
        """Drop every row and delete the spill files."""
        self._memory.clear()
        self._spilled.clear()
        self._mapped.clear()
        self._memory_bytes = self._on_device_bytes = self._spilled_bytes = 0
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None
        self.files.clear()

    def _fits(self, size: int) -> bool:
        return self.max_bytes is None or self._memory_bytes + size <= self.max_bytes

    def _spill(self, keys: list[bytes], rows: Tensor) -> None:
        """Write ``rows`` to a new file in the spill directory and index ``keys`` into it.

        Raises:
            OSError: the directory or the file could not be written (nothing of this batch is kept then).
        """
        if self.spill_dir is None:
            self.spill_dir = self._spill_dir_factory()
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        file_index = len(self.files)
        path = self.spill_dir / f"prefix_{file_index:06d}.pt"
        try:
            save_atomically(rows.contiguous(), path)
        except OSError as error:
            raise OSError(error.errno, f"cannot write spill file {path}: {error.strerror or error}") from error
        self.files.append(path)
        self._spilled_bytes += rows.numel() * rows.element_size()
        for row, key in enumerate(keys):
            self._spilled[key] = (file_index, row)
