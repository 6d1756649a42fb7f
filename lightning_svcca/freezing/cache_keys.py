"""Content keys for the prefix cache: one hash per sample of a forward call, from the exact bytes of its inputs.

A cached output is only ever served for the very input it was computed from: the key covers the sample's row of
every batched tensor argument (bytes, dtype, shape) and every other argument of the call.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["sample_keys"]


def sample_keys(args: tuple, kwargs: dict) -> list[bytes] | None:
    """One exact content key per sample of a forward call, or ``None`` when the call has no batch of tensors.

    A sample's key hashes (BLAKE2b, 128 bits) the bytes, dtype and shape of its row of every tensor argument whose
    first dimension is the batch size; the other arguments (scalars, options, tensors without a batch dimension)
    are hashed into every key.
    """
    leaves = list(args) + [kwargs[name] for name in sorted(kwargs)]
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor) and leaf.ndim > 0]
    if not tensors:
        return None
    size = int(tensors[0].shape[0])
    shared = hashlib.blake2b(digest_size=16)
    rows = []
    for position, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] == size:
            data = leaf.detach().to("cpu").contiguous()
            shared.update(f"{position}:{data.dtype}:{tuple(data.shape[1:])};".encode())
            rows.append(data.view(torch.uint8).reshape(size, -1).numpy() if data.numel() else None)
        elif isinstance(leaf, Tensor):
            data = leaf.detach().to("cpu").contiguous()
            shared.update(f"{position}:{data.dtype}:{tuple(data.shape)}:".encode())
            shared.update(data.view(torch.uint8).numpy().tobytes())
        else:
            shared.update(f"{position}:{leaf!r};".encode())
    prefix = shared.digest()
    keys = []
    for index in range(size):
        digest = hashlib.blake2b(prefix, digest_size=16)
        for row in rows:
            if row is not None:
                digest.update(row[index])
        keys.append(digest.digest())
    return keys
