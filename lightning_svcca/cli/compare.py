"""The ``lightning-svcca compare`` command: two checkpoints of one model class, layer by layer, on a probe.

Example::

    lightning-svcca compare epoch0.ckpt epoch9.ckpt --model my_pkg.models:Net --probe probe.pt --metrics svcca cca

The model class is given by import path (``pkg.module:Class`` or ``pkg.module.Class``). A LightningModule is
loaded with its ``load_from_checkpoint``; any other ``nn.Module`` class is built without arguments and given the
checkpoint's ``state_dict`` (or the file itself when it is a state dict). The probe is a ``.pt`` file holding
the model input (a tensor, or a batch with ``--input-key``), or ``digits`` / ``digits-flat``: sklearn's 8x8
digits as ``(N, 1, 8, 8)`` images or ``(N, 64)`` rows in ``[0, 1]`` (offline, for quick checks). The module of
``--model`` is looked up in the current directory too. Files are sized before they are loaded
(:mod:`~lightning_svcca.cli.limits`): one that would inflate past ``--max-bytes`` is refused.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_svcca.cli.limits import check_torch_file, default_limit
from lightning_svcca.core.safe_files import load_plain
from lightning_svcca.offline.compare import compare_models
from lightning_svcca.pipeline.metrics import METRICS

__all__ = ["add_compare_command", "load_model", "load_probe"]


def add_compare_command(commands: Any) -> None:
    """Add the ``compare`` subcommand to the CLI's subparsers."""
    help_text = "compare two checkpoints layer by layer (and every layer with every other) on a probe"
    command = commands.add_parser("compare", help=help_text, description=__doc__.split("\n\n")[0])
    command.set_defaults(command=_run, standalone=True)
    command.add_argument("checkpoint_a", type=Path, help="first checkpoint (rows of the cross-layer map)")
    command.add_argument("checkpoint_b", type=Path, help="second checkpoint")
    command.add_argument("--model", required=True, help="model class, pkg.module:Class or pkg.module.Class")
    command.add_argument("--probe", required=True, help="a .pt file with the model input, or digits / digits-flat")
    command.add_argument("--probe-size", type=int, default=None, help="use the first N probe samples")
    command.add_argument("--input-key", default=None, help="the model input in a batch probe (index or key)")
    command.add_argument("--layers", nargs="+", default=None, help="module names (default: Linear/Conv/RNN/...)")
    command.add_argument("--metrics", nargs="+", default=["svcca"], choices=METRICS, metavar="METRIC")
    command.add_argument("--cross-layer-metric", default=None, choices=METRICS, metavar="METRIC")
    command.add_argument("--keep", type=float, default=0.99, help="SVCCA keep fraction (default 0.99)")
    command.add_argument("--reduction", default="positions", choices=("positions", "mean", "flatten"))
    command.add_argument("--max-datapoints", type=int, default=4096)
    command.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="refuse a checkpoint or probe file needing more memory than this (default: half of this machine's)",
    )


def load_model(spec: str, checkpoint: Path, limit: int | None = None) -> nn.Module:
    """Import the class named by ``spec`` and load ``checkpoint`` into it, on the CPU.

    ``limit``: the bytes the checkpoint may take in memory (``None``: half of this machine's memory).

    Raises:
        ValueError: ``spec`` does not name a class, or the checkpoint would take more than ``limit``.
        ImportError: ``spec``'s module cannot be imported (from the current directory or ``sys.path``).
        FileNotFoundError: no checkpoint file.
        UnreadableFileError: the checkpoint holds objects other than tensors and plain values (refused: loading
            them could run code), or it is damaged.
    """
    module_name, _, class_name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not class_name:
        raise ValueError(f"--model must be pkg.module:Class or pkg.module.Class, got {spec!r}")
    model_class = getattr(_import(module_name), class_name, None)
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module):
        raise ValueError(f"--model {spec!r} is not an nn.Module class")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    check_torch_file(checkpoint, default_limit() if limit is None else limit)
    state = load_plain(checkpoint)  # tensors and plain values only; a refused or damaged file: a one-line error
    if hasattr(model_class, "load_from_checkpoint"):
        return model_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    model = model_class()
    model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model


def _import(module_name: str) -> Any:
    """The module ``--model`` names, looked up in the current directory first (as ``python -m`` would)."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"--model: cannot import {module_name!r} from {here} or sys.path ({error})") from error


def load_probe(source: str, size: int | None = None, limit: int | None = None) -> Any:
    """The probe: a ``.pt`` file's contents, or the sklearn digits (``digits`` or ``digits-flat``).

    ``limit``: the bytes the file may take in memory (``None``: half of this machine's memory).
    """
    if source in ("digits", "digits-flat"):
        from sklearn.datasets import load_digits

        images = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
        probe = images if source == "digits-flat" else images.reshape(-1, 1, 8, 8)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no probe file at {path} (give a .pt file, digits or digits-flat)")
        check_torch_file(path, default_limit() if limit is None else limit)
        probe = load_plain(path)
    if size is not None:
        if isinstance(probe, torch.Tensor):
            probe = probe[:size]
        else:
            from lightning_svcca.pipeline.probe import slice_batch

            probe = slice_batch(probe, 0, size)
    return probe


def _run(args: argparse.Namespace) -> int:
    model_a = load_model(args.model, args.checkpoint_a, args.max_bytes)
    model_b = load_model(args.model, args.checkpoint_b, args.max_bytes)
    input_key = args.input_key
    if input_key is not None and input_key.isdigit():
        input_key = int(input_key)
    result = compare_models(
        model_a,
        model_b,
        load_probe(args.probe, args.probe_size, args.max_bytes),
        args.layers,
        args.metrics,
        cross_layer_metric=args.cross_layer_metric,
        keep=args.keep,
        reduction=args.reduction,
        max_datapoints=args.max_datapoints,
        input_key=input_key,
        device="cpu",
    )
    print(f"{args.checkpoint_a} vs {args.checkpoint_b}")
    print(result.to_text())
    return 0
