"""Bounded reading for the command line: file sizes checked before anything is inflated into memory.

A torch checkpoint is a zip file whose members torch stores uncompressed; a crafted one can deflate zeros, so 2 MB
on disk become gigabytes in memory. :func:`check_torch_file` reads the zip directory only (the members' sizes)
and refuses a file whose members would need more than ``limit`` bytes, or that is compressed far beyond what torch
ever writes, before ``torch.load`` touches it. :func:`check_history_file` bounds a history CSV the same way (its
size, and the longest cell Python's ``csv`` module accepts). No torch import here: the history commands stay fast.
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path

__all__ = ["MAX_CELL_CHARACTERS", "MAX_HISTORY_BYTES", "check_history_file", "check_torch_file", "default_limit"]

#: A history CSV larger than this is refused (a million-row history is about 80 MB).
MAX_HISTORY_BYTES = 2**30
#: The longest CSV cell read (Python's ``csv`` default): a longer one is refused with its size.
MAX_CELL_CHARACTERS = csv.field_size_limit()
#: A compressed member expanding more than this many times is refused: torch stores members uncompressed.
_MAX_RATIO = 100


def default_limit() -> int:
    """Bytes a loaded file may take: half of this machine's memory (8 GiB when the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES")) // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def check_torch_file(path: Path, limit: int) -> None:
    """Refuse ``path`` before loading it when it would inflate past ``limit`` bytes.

    Raises:
        ValueError: the zip members add up to more than ``limit``, or a member is compressed more than
            :data:`_MAX_RATIO` times (a deflate bomb); the message names the file, the sizes and the option.
        FileNotFoundError: no such file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):  # the legacy format: pickled in full, about its own size in memory
        if size > limit:
            raise ValueError(f"cannot read {path}: {_gib(size)} is more than the limit of {_gib(limit)} (--max-bytes)")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: a damaged zip file ({error})") from error
    total = sum(member.file_size for member in members)
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED and member.file_size > _MAX_RATIO * max(member.compress_size, 1):
            raise ValueError(
                f"cannot read {path}: its member {member.filename[:80]!r} inflates {member.compress_size} bytes to"
                f" {_gib(member.file_size)} (torch never compresses checkpoints): refused"
            )
    if total > limit:
        raise ValueError(
            f"cannot read {path}: it would take {_gib(total)} in memory, more than the limit of {_gib(limit)};"
            " raise it with --max-bytes if the file is trusted"
        )


def check_history_file(path: Path) -> None:
    """Refuse a history CSV larger than :data:`MAX_HISTORY_BYTES` before reading it.

    Raises:
        ValueError: the file is larger; the message gives its size.
    """
    size = path.stat().st_size
    if size > MAX_HISTORY_BYTES:
        raise ValueError(f"{_gib(size)}, more than the {_gib(MAX_HISTORY_BYTES)} a history file may have")


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"
