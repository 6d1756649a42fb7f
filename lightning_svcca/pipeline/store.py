"""Where snapshots live: :class:`SnapshotStore` keeps them within a memory budget, the rest in files."""

from __future__ import annotations

import re
import shutil
import tempfile
import zlib
from collections import OrderedDict
from pathlib import Path

from lightning_svcca.core.safe_files import (
    UnreadableFileError,
    load_snapshot_state,
    report_unreadable,
    save_atomically,
    try_write,
)
from lightning_svcca.pipeline.snapshot import Snapshot

__all__ = ["SnapshotStore"]


class SnapshotStore:
    """Snapshots by ``(layer, tag)``, with at most ``max_bytes`` of them in memory.

    Two modes:

    * **persistent** (``directory`` given: the run's folder, beside its event files): every snapshot is written to
      a file when stored, the memory holds the most recently used ones within the budget, and :meth:`state_dict`
      holds file names only, so a checkpoint stays small however long the run. Files are never deleted by the
      store: checkpoints of the run may need them; they go with the run's folder.
    * **in memory** (``directory=None``): beyond the budget the least recently used snapshots spill to a temporary
      folder (deleted by :meth:`close`), and :meth:`state_dict` holds the tensors themselves.

    Args:
        max_bytes: budget for snapshots held in memory (``None``: unbounded).
        directory: the persistent folder, or ``None``.
    """

    def __init__(self, max_bytes: int | None, directory: Path | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_snapshot_bytes must be >= 0 or None, got {max_bytes}")
        self.max_bytes = max_bytes
        self.directory = None if directory is None else Path(directory)
        self._spill_dir: Path | None = None
        self._memory: OrderedDict[tuple[str, str], Snapshot] = OrderedDict()
        # id(snapshot) -> [keys holding it in memory, its bytes]: memory_bytes without a pass over every snapshot
        self._held: dict[int, list[int]] = {}
        self._held_bytes = 0
        self._files: dict[tuple[str, str], Path] = {}
        self._failed: set[Path] = set()  # folders a write failed in (warned once)

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory now (a snapshot stored under several keys counts once)."""
        return self._held_bytes

    @property
    def spill_dir(self) -> Path | None:
        """Where snapshots not held in memory live (the persistent folder, or the temporary spill folder)."""
        return self.directory if self.directory is not None and self._files else self._spill_dir

    @property
    def writable_directory(self) -> Path | None:
        """The persistent folder while its writes succeed (``None``: in memory, or its last write failed)."""
        return self.directory if self.directory is not None and self.directory not in self._failed else None

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._memory or key in self._files

    def keys(self) -> list[tuple[str, str]]:
        """Every stored key, in memory or in a file."""
        return list(dict.fromkeys([*self._memory, *self._files]))

    def put(self, key: tuple[str, str], snapshot: Snapshot) -> None:
        """Store (or replace) a snapshot (written to its file in persistent mode), then hold the budget."""
        self.discard(key)
        if self.directory is not None:
            self._write_persistent(key, snapshot)
        self._hold(key, snapshot)
        self._enforce_budget()

    def alias(self, key: tuple[str, str], existing: tuple[str, str]) -> None:
        """Store under ``key`` the snapshot stored under ``existing``, without a copy.

        The same object in memory, the same file in persistent mode: a frozen layer's snapshot, unchanged since.
        """
        if self.directory is not None and existing in self._files:
            self.discard(key)
            self._files[key] = self._files[existing]
            if existing in self._memory:
                self._hold(key, self._memory[existing])
            return
        self.put(key, self.get(existing))

    def get(self, key: tuple[str, str]) -> Snapshot:
        """A stored snapshot; one not in memory is memory-mapped from its file, not brought back into memory."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if key in self._files:
            try:
                return Snapshot.from_state(load_snapshot_state(self._files[key]))
            except UnreadableFileError as error:  # reported once, then forgotten: comparisons needing it skip
                self.discard(key)
                report_unreadable(error, f"snapshot of layer {key[0]!r} at {key[1]}")
                raise KeyError(key) from error
        raise KeyError(key)

    def discard(self, key: tuple[str, str]) -> None:
        """Forget a snapshot (a temporary spill file is deleted; a persistent file stays for older checkpoints).

        Files loaded from another store's persistent folder (rank zero's, on the other ranks) are not ours to delete.
        """
        self._release(key)
        path = self._files.pop(key, None)
        if path is not None and self._spill_dir is not None and path.parent == self._spill_dir:
            path.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, dict]:
        """Keyed ``"layer@tag"``: the file's name in persistent mode (folder under ``""``), else its tensors."""
        if self.directory is not None:
            state: dict[str, dict] = {"": {"folder": str(self.directory)}}
            for layer, tag in self.keys():
                path = self._files.get((layer, tag))
                if path is None:  # its write failed: the tensors themselves (written again after a resume)
                    state[f"{layer}@{tag}"] = self.get((layer, tag)).to_state()
                    continue
                state[f"{layer}@{tag}"] = {"name": path.name} if path.parent == self.directory else {"file": str(path)}
            return state
        return {f"{layer}@{tag}": self.get((layer, tag)).to_state() for layer, tag in self.keys()}

    def load_state_dict(self, state: dict[str, dict]) -> list[str]:
        """Replace the contents with a :meth:`state_dict` of either mode; returns the keys whose file is gone."""
        for key in self.keys():
            self.discard(key)
        missing = []
        folder = Path(state[""]["folder"]) if "" in state else None
        for joined, entry in state.items():
            if not joined:
                continue
            layer, _, tag = joined.rpartition("@")
            if "file" not in entry and "name" not in entry:
                self.put((layer, tag), Snapshot.from_state(entry))
                continue
            path = Path(entry["file"]) if "file" in entry else folder / entry["name"]  # type: ignore[operator]
            if path.is_file():
                self._files[(layer, tag)] = path
            else:
                missing.append(joined)
        return missing

    def persist_to(self, directory: Path) -> None:
        """Switch to persistent mode in ``directory``; snapshots held only in memory are written there."""
        self.directory = Path(directory)
        for key, snapshot in self._memory.items():
            if key not in self._files:
                self._write_persistent(key, snapshot)

    def close(self) -> None:
        """Release memory-mapped files and delete the temporary spill folder; persistent files and memory stay."""
        if self.directory is None:
            self._files.clear()
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def _enforce_budget(self) -> None:
        if self.max_bytes is None:
            return
        while self._memory and self.memory_bytes > self.max_bytes:
            key = next(iter(self._memory))
            snapshot = self._release(key)
            assert snapshot is not None
            if key not in self._files:
                if self._spill_dir is None:
                    self._spill_dir = Path(tempfile.mkdtemp(prefix="svcca_spill_"))
                path = try_write(
                    self._write, self._spill_dir, key, snapshot, where=self._spill_dir, warned=self._failed
                )
                if path is None:  # no room on disk either: it stays in memory
                    self._hold(key, snapshot)
                    self._memory.move_to_end(key, last=False)
                    return
                self._files[key] = path

    def _hold(self, key: tuple[str, str], snapshot: Snapshot) -> None:
        """Hold ``snapshot`` in memory under ``key`` (not held already); its bytes count once however many keys."""
        self._memory[key] = snapshot
        entry = self._held.setdefault(id(snapshot), [0, snapshot.nbytes])
        if entry[0] == 0:
            self._held_bytes += entry[1]
        entry[0] += 1

    def _release(self, key: tuple[str, str]) -> Snapshot | None:
        """Drop ``key`` from memory; the snapshot it held, or ``None``."""
        snapshot = self._memory.pop(key, None)
        if snapshot is not None:
            entry = self._held[id(snapshot)]
            entry[0] -= 1
            if entry[0] == 0:
                del self._held[id(snapshot)]
                self._held_bytes -= entry[1]
        return snapshot

    @staticmethod
    def _write(folder: Path, key: tuple[str, str], snapshot: Snapshot) -> Path:
        """Write a snapshot to ``folder`` atomically (a unique temporary name, then a rename)."""
        folder.mkdir(parents=True, exist_ok=True)
        layer, tag = key
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{layer}@{tag}")[:80]
        path = folder / f"{safe}-{zlib.crc32(f'{layer}@{tag}'.encode()):08x}.pt"
        return save_atomically(snapshot.to_state(), path)

    def _write_persistent(self, key: tuple[str, str], snapshot: Snapshot) -> None:
        """Write to the persistent folder; when that fails (warned once) the snapshot is kept in memory only."""
        assert self.directory is not None
        path = try_write(self._write, self.directory, key, snapshot, where=self.directory, warned=self._failed)
        if path is not None:
            self._files[key] = path
