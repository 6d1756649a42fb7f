"""Vocabulary-sized output heads: left out of the default layers, because measuring them dwarfs everything else.

A language model's output head (GPT-2's ``lm_head``: 768 features in, 50,257 out) maps each position to a score
per vocabulary entry. Its rows are as wide as the vocabulary, so its decomposition costs far more than every
block together (87 s of a 100 s measurement and 5.4 GiB on GPT-2 with a 32 x 128-token probe), and its
similarity mostly repeats the last block's. :func:`vocab_heads` finds such heads among layer names: a module
whose last ``nn.Linear`` has at least :data:`VOCAB_MIN_WIDTH` outputs and :data:`VOCAB_RATIO` times more outputs
than inputs. Naming one in ``layers=`` still measures it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_svcca.pipeline.wrappers import modules_by_name

__all__ = ["VOCAB_MIN_WIDTH", "VOCAB_RATIO", "vocab_heads"]

#: A head this wide or wider (outputs) ...
VOCAB_MIN_WIDTH = 4096
#: ... and this many times wider than its input is a vocabulary head.
VOCAB_RATIO = 8


def vocab_heads(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """The vocabulary-sized output heads among ``names``: name -> (input features, output features).

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10_000))
        >>> vocab_heads(model, ["0", "2"])
        {'2': (64, 10000)}
    """
    modules = modules_by_name(model)
    found = {}
    for name in names:
        module = modules.get(name)
        linears = [sub for sub in module.modules() if isinstance(sub, nn.Linear)] if module is not None else []
        if not linears:
            continue
        last = linears[-1]
        if last.out_features >= VOCAB_MIN_WIDTH and last.out_features >= VOCAB_RATIO * last.in_features:
            found[name] = (last.in_features, last.out_features)
    return found
