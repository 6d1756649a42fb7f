"""Keys for the prefix cache: one per sample of a forward call, from its input bytes or from its dataset index.

By content (``cache_key="bytes"``, :func:`sample_keys`): a cached output is only ever served for the very input it
was computed from; the key covers the sample's row of every batched tensor argument (bytes, dtype, shape) and every
other argument of the call. This costs a copy of the inputs to the host and a hash of every byte, each batch.

By index (``cache_key="index"``, :func:`index_keys`): the dataset is wrapped in :class:`IndexedDataset`, whose
samples carry their index; :func:`take_indices` takes the indices out of each training batch before the training
step sees it (the callback calls it at each batch start), and the key is the index with the call's layout (dtype
and row shape of each batched argument, the other arguments). No input byte is read: this trusts that a sample's
input is a fixed function of its index (no random augmentation), which the cache's verification checks on a sample
of batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["INDEX_FIELD", "IndexedDataset", "index_keys", "sample_keys", "take_indices"]

#: The field that carries a sample's index in :class:`IndexedDataset`'s samples and their batches.
INDEX_FIELD = "svcca_index"


class IndexedDataset(Dataset):
    """A map-style dataset whose samples carry their index, for ``FreezePolicy(cache_key="index")``.

    A tuple or list sample ``(x, y)`` becomes ``(x, y, {"svcca_index": "17"})``; a dict sample gets the key
    ``"svcca_index"``. The index is a string, so collation keeps it on the host (no device copy, no sync). The
    callback removes it from each training batch (:func:`take_indices`) before the training step runs, so the step
    sees the batch it would see without the wrapper. Wrap the training dataset only.

    Args:
        dataset: the dataset to index (its ``__getitem__`` must return a tuple, list or dict).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        if isinstance(sample, dict):
            return {**sample, INDEX_FIELD: str(int(index))}
        if isinstance(sample, (tuple, list)):
            return (*sample, {INDEX_FIELD: str(int(index))})
        raise TypeError(
            f"IndexedDataset needs samples that are tuples, lists or dicts (to carry the index beside them), got"
            f" {type(sample).__name__}: return (x,) instead of x"
        )


def take_indices(batch: Any) -> list[str] | None:
    """Remove the indices from a batch of :class:`IndexedDataset` samples, in place; ``None`` for another batch."""
    if isinstance(batch, dict) and INDEX_FIELD in batch:
        return list(batch.pop(INDEX_FIELD))
    if isinstance(batch, list) and batch and isinstance(batch[-1], dict) and set(batch[-1]) == {INDEX_FIELD}:
        return list(batch.pop()[INDEX_FIELD])
    return None


def sample_keys(args: tuple, kwargs: dict) -> list[bytes] | None:
    """One exact content key per sample of a forward call, or ``None`` when the call has no batch of tensors.

    A sample's key hashes (BLAKE2b, 128 bits) the bytes, dtype and shape of its row of every tensor argument whose
    first dimension is the batch size; the other arguments (scalars, options, tensors without a batch dimension)
    are hashed into every key.
    """
    call = _call_layout(args, kwargs)
    if call is None:
        return None
    prefix, batched, size = call
    rows = []
    for leaf in batched:
        data = leaf.detach().to("cpu").contiguous()
        rows.append(data.view(torch.uint8).reshape(size, -1).numpy() if data.numel() else None)
    keys = []
    for index in range(size):
        digest = hashlib.blake2b(prefix, digest_size=16)
        for row in rows:
            if row is not None:
                digest.update(row[index])
        keys.append(digest.digest())
    return keys


def index_keys(indices: Sequence[str], args: tuple, kwargs: dict) -> list[bytes] | None:
    """One key per sample from its dataset index and the call's layout; ``None`` when the batch does not match.

    The layout (each batched argument's dtype and row shape, the other arguments) is part of the key, so a sample
    padded to another length in another batch gets another key.
    """
    call = _call_layout(args, kwargs)
    if call is None or call[2] != len(indices):
        return None
    prefix = call[0]
    return [hashlib.blake2b(index.encode(), digest_size=16, key=prefix).digest() for index in indices]


def _call_layout(args: tuple, kwargs: dict) -> tuple[bytes, list[Tensor], int] | None:
    """The hash of what all samples of a call share, its batched tensor arguments, and the batch size."""
    leaves = list(args) + [kwargs[name] for name in sorted(kwargs)]
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor) and leaf.ndim > 0]
    if not tensors:
        return None
    size = int(tensors[0].shape[0])
    shared = hashlib.blake2b(digest_size=16)
    batched = []
    for position, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] == size:
            shared.update(f"{position}:{leaf.dtype}:{tuple(leaf.shape[1:])};".encode())
            batched.append(leaf)
        elif isinstance(leaf, Tensor):
            data = leaf.detach().to("cpu").contiguous()
            shared.update(f"{position}:{data.dtype}:{tuple(data.shape)}:".encode())
            shared.update(data.view(torch.uint8).numpy().tobytes())
        else:
            shared.update(f"{position}:{leaf!r};".encode())
    return shared.digest(), batched, size
