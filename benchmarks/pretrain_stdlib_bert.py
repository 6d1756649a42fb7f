"""Pretrain workload (e)'s BERT by masked-language modelling on the Python standard library's source; cache it.

The corpus, tokenizer and vocabulary are ``stdlib_corpus.py``'s: the stdlib's ``.py`` files without the eight
packages held out for the fine-tuning task. The model is ``transformers.BertForMaskedLM`` from a small
``BertConfig`` (:func:`stdlib_config`: hidden 128, 4 layers of 4 heads, intermediate 256, 128 positions, no
dropout, so that the fine-tune's frozen prefix can be cached), randomly initialised: nothing is downloaded.

Training (:func:`pretrain`): the encoded corpus is one stream of ids; each step takes ``batch`` windows of
``length`` ids at random offsets (``[CLS]`` first), masks 15% of the positions after ``[CLS]`` (of those 80%
``[MASK]``, 10% a random token, 10% unchanged) and minimises the cross-entropy of the masked positions only (the
output layer runs on them alone). AdamW (weight decay 0.01), a linear warm-up over the first 6% of the steps, then a
cosine decay to 0. Seeded (weights, offsets, masks) and run on one CPU thread, so the weights are the same on every
run with the same corpus, settings and torch build.

The weights (``bert.*`` and the MLM head), the vocabulary and the loss curve are cached under
``$LIGHTNING_SVCCA_BENCH_CACHE`` (default ``~/.cache/lightning_svcca/benchmarks``) in
``stdlib_bert-{key}/``, where ``key`` hashes the corpus (every file's path and bytes, :func:`stdlib_corpus.corpus_hash`)
and the settings: a different stdlib (another Python version) or other settings train afresh, once.

Run: ``python benchmarks/pretrain_stdlib_bert.py [--quick] [--force]``: trains (unless cached; ``--force``: anyway)
and prints the time and the loss curve (mean MLM loss per 5% of the steps). ``--quick``: a tiny run (every
eighth file, a few steps) for tests, cached under its own key. The benchmark (``freeze_benchmark.py --workloads
e``) calls :func:`pretrained`, which trains on first use.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stdlib_corpus import CLS, MASK, SPECIALS, Vocabulary, corpus_hash, pretraining_files, read  # noqa: E402

CACHE_ENV = "LIGHTNING_SVCCA_BENCH_CACHE"
#: Bump when the training code changes in a way the settings do not show.
VERSION = 1


@dataclass(frozen=True)
class Settings:
    """What the pretraining trains on and for how long (everything that goes into the cache key)."""

    steps: int = 1200
    batch: int = 32
    length: int = 128  # positions per window, [CLS] included
    lr: float = 1e-3
    warmup: float = 0.06
    vocabulary: int = 4096
    mask_share: float = 0.15
    file_stride: int = 1  # every n-th pretraining file (quick runs: fewer)
    seed: int = 0

    @classmethod
    def quick(cls) -> Settings:
        """Seconds: every eighth file, 30 steps of 8 windows."""
        return cls(steps=30, batch=8, length=64, vocabulary=1024, file_stride=8)


def stdlib_config(vocabulary: int):
    """The BERT configuration of (e): hidden 128, 4 layers, 4 heads, intermediate 256, 128 positions, no dropout."""
    import transformers

    return transformers.BertConfig(
        vocab_size=vocabulary, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )  # fmt: skip


def cache_dir() -> Path:
    """``$LIGHTNING_SVCCA_BENCH_CACHE`` or ``~/.cache/lightning_svcca/benchmarks``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_svcca" / "benchmarks")


def cache_key(settings: Settings, files: list[Path]) -> str:
    """16 hex digits of SHA-256 over the corpus hash, the settings and :data:`VERSION`."""
    text = json.dumps({"corpus": corpus_hash(files), "settings": dataclasses.asdict(settings), "version": VERSION})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mask(ids: Tensor, share: float, vocabulary: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT's masking of ``ids`` (batch, length; position 0 is ``[CLS]``, never masked): (inputs, chosen positions)."""
    chosen = torch.rand(ids.shape, generator=generator) < share
    chosen[:, 0] = False
    draw = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(len(SPECIALS), vocabulary, ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (draw < 0.8)] = MASK
    swap = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[swap] = random_ids[swap]
    return inputs, chosen


def pretrain(settings: Settings, log_every: int | None = None) -> tuple[nn.Module, Vocabulary, list[float]]:
    """Train a ``BertForMaskedLM`` as the module docstring says; returns it, the vocabulary and the per-step losses."""
    import transformers

    files = pretraining_files()[:: settings.file_stride]
    texts = [read(path) for path in files]
    vocabulary = Vocabulary.build(texts, settings.vocabulary)
    stream = torch.cat([vocabulary.encode(text) for text in texts])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(settings.seed)
        model = transformers.BertForMaskedLM(stdlib_config(len(vocabulary)))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
        warm = max(1, int(settings.warmup * settings.steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, settings.steps - warm)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        generator = torch.Generator().manual_seed(settings.seed)
        body = settings.length - 1
        losses = []
        for step in range(settings.steps):
            starts = torch.randint(0, len(stream) - body, (settings.batch,), generator=generator)
            windows = torch.stack([stream[start : start + body] for start in starts.tolist()])
            ids = torch.cat([torch.full((settings.batch, 1), CLS, dtype=torch.long), windows], dim=1)
            inputs, chosen = mask(ids, settings.mask_share, len(vocabulary), generator)
            hidden = model.bert(input_ids=inputs).last_hidden_state
            logits = model.cls(hidden[chosen])
            loss = nn.functional.cross_entropy(logits, ids[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if log_every and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                print(f"step {step + 1:>5}: MLM loss {sum(recent) / len(recent):.3f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, vocabulary, losses


def pretrained(settings: Settings | None = None, force: bool = False, verbose: bool = False) -> tuple[dict, Vocabulary]:
    """The pretrained encoder's ``state_dict`` (``BertModel`` keys) and the vocabulary; trained and cached if new."""
    settings = settings or Settings()
    files = pretraining_files()[:: settings.file_stride]
    directory = cache_dir() / f"stdlib_bert-{cache_key(settings, files)}"
    if force or not (directory / "done").exists():
        start, cpu_start = time.perf_counter(), time.process_time()
        model, vocabulary, losses = pretrain(settings, log_every=max(1, settings.steps // 20) if verbose else None)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), directory / "model.pt")
        (directory / "vocabulary.json").write_text(json.dumps(vocabulary.tokens))
        meta = {
            "settings": dataclasses.asdict(settings), "files": len(files), "corpus": corpus_hash(files),
            "python": sys.version.split()[0], "torch": torch.__version__, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "losses": losses,
        }  # fmt: skip
        (directory / "meta.json").write_text(json.dumps(meta))
        (directory / "done").write_text("")
        if verbose:
            print(f"pretrained in {seconds:.0f} s ({cpu_seconds:.0f} s CPU), cached in {directory}", flush=True)
    elif verbose:
        print(f"cached in {directory}", flush=True)
    state = torch.load(directory / "model.pt", weights_only=True)
    encoder = {key.removeprefix("bert."): value for key, value in state.items() if key.startswith("bert.")}
    return encoder, Vocabulary(json.loads((directory / "vocabulary.json").read_text()))


def loss_curve(settings: Settings | None = None, parts: int = 20) -> list[tuple[int, float]]:
    """(last step, mean loss) over ``parts`` equal spans of the cached run's steps."""
    settings = settings or Settings()
    files = pretraining_files()[:: settings.file_stride]
    meta = json.loads((cache_dir() / f"stdlib_bert-{cache_key(settings, files)}" / "meta.json").read_text())
    losses = meta["losses"]
    span = max(1, len(losses) // parts)
    return [(end, sum(losses[end - span : end]) / span) for end in range(span, len(losses) + 1, span)]


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, pretrain (or find the cache), print the time and the loss curve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run for tests")
    parser.add_argument("--force", action="store_true", help="train even when cached")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    print(f"settings: {settings}", flush=True)
    pretrained(settings, force=args.force, verbose=True)
    files = pretraining_files()[:: settings.file_stride]
    meta = json.loads((cache_dir() / f"stdlib_bert-{cache_key(settings, files)}" / "meta.json").read_text())
    print(
        f"{meta['files']} files, Python {meta['python']}, torch {meta['torch']}: {meta['seconds']:.0f} s"
        f" ({meta['cpu_seconds']:.0f} s CPU) for {settings.steps} steps of {settings.batch} x {settings.length}"
    )
    print("MLM loss by span of steps: " + ", ".join(f"{loss:.3f}@{end}" for end, loss in loss_curve(settings)))


if __name__ == "__main__":
    main()
