"""Workload (e)'s data: the Python standard library's own source text, found on every machine that runs Python.

* **Corpus.** The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (the running interpreter's), sorted by
  their path relative to it, without ``site-packages``, the test suites (any ``test``/``tests`` directory),
  ``idlelib``, ``turtledemo``, the generated ``pydoc_data`` and ``encodings`` (codec tables), ``__phello__`` and the
  build configuration (``config-*``, ``_sysconfigdata*``). About 9 MB of code on CPython 3.11. The stdlib differs a
  little between Python versions; :func:`corpus_hash` (every file's path and bytes) keys the cached pretraining.
* **Tokenizer.** :func:`tokenize`: a regular expression splits the text into identifiers/words, numbers, newlines
  and punctuation (common two-character operators kept whole); no whitespace otherwise. The vocabulary
  (:class:`Vocabulary`) is ``[PAD] [UNK] [CLS] [MASK]`` then the most frequent tokens of the pretraining corpus
  (ties broken by the token's text), so it is the same on every machine with the same corpus.
* **Split.** The files of :data:`HELD_OUT` (eight packages, about 2.9 MB) are kept out of the pretraining
  (masked-language modelling, ``pretrain_stdlib_bert.py``) and make the fine-tuning task.
* **Fine-tuning task** (:func:`package_task`): which of the eight held-out packages a window of 63 consecutive
  tokens (after ``[CLS]``: 64 positions) comes from. The windows of training and test come from different files:
  within each package whole files go to the test set, largest first, while they fit in a quarter of the package's
  text; the rest to training. Windows are cut without overlap from each file and drawn balanced per package with a
  fixed seed. It is the kind of task a code model is fine-tuned for (topic classification of unseen code), on the
  same language as the pretraining, and it cannot be solved by memorising a file; accuracy stays well below 100%
  (some windows are generic: imports, ``__init__`` plumbing). Measured (``stdlib_transfer.py``, seed 0): the
  pretrained encoder starts faster but ends lower than a random one (69.3% against 75.9% after 8 epochs), so the
  pretraining is not yet one a user would keep for this task (``docs/freezing.md``, workload (e)).
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

#: The packages whose files make the fine-tuning task (label = index here) and are kept out of the pretraining.
HELD_OUT = ("asyncio", "distutils", "email", "importlib", "lib2to3", "multiprocessing", "tkinter", "xml")
#: Top-level directories (or file prefixes) never read.
EXCLUDED = (
    "site-packages", "idlelib", "turtledemo", "pydoc_data", "encodings", "__phello__", "config-", "_sysconfigdata",
)  # fmt: skip
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[MASK]")
PAD, UNK, CLS, MASK = range(4)
WINDOW = 64  # [CLS] and 63 tokens
TEST_SHARE = 0.25  # of each package's characters, by whole files
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\n|==|!=|<=|>=|->|\*\*|//|\+=|-=|[^\sA-Za-z0-9_]")


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The corpus's files, as paths relative to ``root`` (default :func:`stdlib_root`), sorted."""
    root = root or stdlib_root()
    files = []
    for directory, subdirectories, names in os.walk(root):
        relative = Path(directory).relative_to(root)
        subdirectories[:] = [
            name
            for name in subdirectories
            if name not in ("test", "tests", "__pycache__") and not (relative == Path() and name.startswith(EXCLUDED))
        ]
        files += [relative / name for name in names if name.endswith(".py") and not name.startswith(EXCLUDED)]
    return sorted(files, key=lambda path: path.as_posix())


def package_of(path: Path) -> str | None:
    """The held-out package ``path`` (relative to the stdlib) belongs to, or ``None`` (a pretraining file)."""
    return path.parts[0] if len(path.parts) > 1 and path.parts[0] in HELD_OUT else None


def read(path: Path, root: Path | None = None) -> str:
    """A file's text (UTF-8, undecodable bytes replaced)."""
    return ((root or stdlib_root()) / path).read_bytes().decode("utf-8", errors="replace")


def corpus_hash(files: Iterable[Path], root: Path | None = None) -> str:
    """SHA-256 over every file's relative path and bytes, in order: a different stdlib gives a different hash."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.as_posix().encode() + b"\0" + ((root or stdlib_root()) / path).read_bytes() + b"\0")
    return digest.hexdigest()


def tokenize(text: str) -> list[str]:
    """Identifiers and words, numbers, newlines, two-character operators and single punctuation characters."""
    return _TOKEN.findall(text)


@dataclass
class Vocabulary:
    """Tokens by id: the four specials, then corpus tokens by decreasing frequency (ties by text)."""

    tokens: list[str]

    def __post_init__(self) -> None:
        self.ids = {token: index for index, token in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Iterable[str], size: int) -> Vocabulary:
        """The ``size - 4`` most frequent tokens of ``texts`` after the specials."""
        counts = Counter(token for text in texts for token in tokenize(text))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls([*SPECIALS, *(token for token, _ in ranked[: size - len(SPECIALS)])])

    def encode(self, text: str) -> Tensor:
        """Token ids of ``text`` (``[UNK]`` for tokens outside the vocabulary)."""
        return torch.tensor([self.ids.get(token, UNK) for token in tokenize(text)], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.tokens)


def pretraining_files(root: Path | None = None) -> list[Path]:
    """The corpus without the held-out packages."""
    return [path for path in stdlib_files(root) if package_of(path) is None]


def package_task(
    vocabulary: Vocabulary, train_count: int, test_count: int, seed: int = 0, root: Path | None = None
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(train, test) windows ``[CLS] + 63 tokens`` labelled by held-out package, balanced, from disjoint files.

    ``train_count`` / ``test_count`` are rounded down to a multiple of the eight packages; each package gives
    ``count // 8`` windows drawn without replacement (a generator seeded with ``seed``) from the non-overlapping
    windows of its training (or test) files, in a shuffled order.
    """
    files = stdlib_files(root)
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {"train": [], "test": []}
    for label, package in enumerate(HELD_OUT):
        members = [path for path in files if package_of(path) == package]
        test_files = _test_files(members, root)
        for split, count in (("train", train_count), ("test", test_count)):
            chosen = [path for path in members if (path in test_files) == (split == "test")]
            windows = torch.cat([_windows(vocabulary.encode(read(path, root))) for path in chosen])
            per_class = count // len(HELD_OUT)
            if len(windows) < per_class:
                raise ValueError(f"{package} has {len(windows)} {split} windows, fewer than {per_class}")
            picked = windows[torch.randperm(len(windows), generator=generator)[:per_class]]
            parts[split].append((picked, torch.full((per_class,), label, dtype=torch.long)))
    result = []
    for split in ("train", "test"):
        x = torch.cat([x for x, _ in parts[split]])
        y = torch.cat([y for _, y in parts[split]])
        order = torch.randperm(len(x), generator=generator)
        result.append((x[order], y[order]))
    return result[0], result[1]


def _test_files(members: list[Path], root: Path | None) -> set[Path]:
    """At most a quarter of a package's text, by whole files: largest first, each that still fits in the quarter."""
    sizes = {path: len(read(path, root)) for path in members}
    room = TEST_SHARE * sum(sizes.values())
    test: set[Path] = set()
    for path in sorted(members, key=lambda path: (-sizes[path], path.as_posix())):
        if sizes[path] <= room:
            test.add(path)
            room -= sizes[path]
    return test


def _windows(ids: Tensor) -> Tensor:
    """Non-overlapping windows of ``WINDOW - 1`` ids, each after ``[CLS]`` (the ragged end dropped)."""
    count = len(ids) // (WINDOW - 1)
    body = ids[: count * (WINDOW - 1)].view(count, WINDOW - 1)
    return torch.cat([torch.full((count, 1), CLS, dtype=torch.long), body], dim=1)
