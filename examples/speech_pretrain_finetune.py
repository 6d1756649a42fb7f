"""A wav2vec2 encoder, pretrained then fine-tuned: which layers change, and how close each is to the input features?

The layer-wise analyses of self-supervised speech models (Pasad et al. 2021, "Layer-wise analysis of a
self-supervised speech representation model"; Pasad et al. 2023) compare every transformer layer, frame by
frame, with the pretrained model and with the input's log-mel features, padding left out. This example does the
same, offline and small:

1. A wav2vec2 (Hugging Face ``transformers``, built from a ``Wav2Vec2Config``: random init, nothing downloaded)
   with a three-layer convolutional feature encoder (20 ms frames) and four transformer layers is pretrained on a
   proxy task: which of six tone frequencies a noisy clip holds. Clips are synthetic audio of varied lengths,
   padded on the right, with an ``attention_mask``.
2. It is fine-tuned, with a new output layer, on another task: whether a tone rises, falls or stays flat.
3. Meanwhile :class:`~lightning_svcca.SVCCACallback` compares the feature projection and each transformer layer,
   every epoch, with the pretrained model (a frozen copy) and with log-mel features of the probe clips (computed
   here with torch, one 16-band frame per encoder frame). The probe is a batch dict; the model is called as
   ``model(**probe)`` and ``attention_mask`` is the padding mask, so padded frames are never datapoints.

The table shows, per layer, SVCCA to the log-mel features before and after fine-tuning, and to the pretrained
model at the end. As in the papers' fine-tuned models, similarity to the pretrained model falls layer by layer:
the feature projection changes least, the top transformer layer, nearest the new task, most. Similarity to the
log-mel features is modest throughout (the tone tasks need pitch, not the whole spectrum) and is highest in the
lower transformer layers.

Run::

    python examples/speech_pretrain_finetune.py            # about 1-2 minutes on two CPU cores
    python examples/speech_pretrain_finetune.py --quick    # a short run (what the tests run)
    tensorboard --logdir runs/speech_pretrain_finetune

TensorBoard events and ``svcca_history.csv`` go under ``--root``.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

from lightning_svcca import SVCCACallback
from lightning_svcca.output.reporting import HISTORY_FILE

from common import HelpFormatter, add_run_arguments, format_columns, run_example
from finetune_reference import last_values, trainer

SAMPLE_RATE = 4000
#: samples per encoder frame: the feature encoder's kernels equal its strides (5 * 4 * 4), so frame t covers
#: samples [80 t, 80 t + 80) exactly, like one log-mel frame
HOP = 80
MIN_FRAMES, MAX_FRAMES = 12, 30
MELS = 16
TONES = tuple(300.0 * 1.25**k for k in range(6))  # the pretraining classes, Hz
SHAPES = ("rising", "falling", "flat")  # the fine-tuning classes
LAYERS = ("model.wav2vec2.feature_projection", *(f"model.wav2vec2.encoder.layers.{i}" for i in range(4)))
TABLE_TITLE = "SVCCA per layer (bottom-up): to log-mel features, and to the pretrained model after fine-tuning"


def config(num_labels: int) -> Wav2Vec2Config:
    """A tiny wav2vec2: 32-channel conv encoder (20 ms frames), 4 transformer layers of width 32."""
    return Wav2Vec2Config(
        num_labels=num_labels,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32),
        conv_kernel=(5, 4, 4),
        conv_stride=(5, 4, 4),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",  # per-frame LayerNorm: the variant meant to be called with an attention_mask
        do_stable_layer_norm=False,  # post-norm transformer layers, as in wav2vec2-base
        classifier_proj_size=32,
        mask_time_prob=0.0,
        layerdrop=0.0,
    )


class SpeechClassifier(pl.LightningModule):
    """A :class:`Wav2Vec2ForSequenceClassification` (mean-pooled frames, then a linear head) with AdamW."""

    def __init__(self, num_labels: int, lr: float = 2e-3) -> None:
        super().__init__()
        self.lr = lr
        self.model = Wav2Vec2ForSequenceClassification(config(num_labels))

    def forward(self, input_values: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits of a batch of clips ``(N, samples)``; ``attention_mask`` is 1 on real samples."""
        return self.model(input_values=input_values, attention_mask=attention_mask).logits

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on a batch ``(audio, mask, label)``."""
        audio, mask, label = batch
        loss = nn.functional.cross_entropy(self(audio, mask), label)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW at a constant learning rate."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)


def clips(task: str, count: int, generator: torch.Generator) -> TensorDataset:
    """``count`` noisy tone clips of ``MIN_FRAMES``-``MAX_FRAMES`` frames, right-padded: (audio, mask, label).

    ``task="tone"``: label = which of ``TONES`` (with 3% jitter). ``task="shape"``: label = whether the pitch
    rises, falls or stays (by a factor of 1.6 over the clip) from a random start between 300 and 1000 Hz.
    """
    samples = MAX_FRAMES * HOP
    lengths = HOP * torch.randint(MIN_FRAMES, MAX_FRAMES + 1, (count,), generator=generator)
    mask = (torch.arange(samples)[None, :] < lengths[:, None]).long()
    classes = len(TONES) if task == "tone" else len(SHAPES)
    labels = torch.randint(classes, (count,), generator=generator)
    position = torch.arange(samples)[None, :] / lengths[:, None]  # 0 -> 1 over each clip
    if task == "tone":
        start = torch.tensor(TONES)[labels] * (1 + 0.03 * torch.randn(count, generator=generator))
        frequency = start[:, None].expand(count, samples)
    else:
        start = 300 + 700 * torch.rand(count, generator=generator)
        slope = torch.tensor([1.0, -1.0, 0.0])[labels]
        frequency = start[:, None] * 1.6 ** (slope[:, None] * position)
    phase = 2 * math.pi * torch.cumsum(frequency, dim=1) / SAMPLE_RATE + 2 * math.pi * torch.rand(count, 1)
    amplitude = 0.5 + torch.rand(count, 1, generator=generator)
    audio = amplitude * torch.sin(phase) + 0.3 * torch.randn(count, samples, generator=generator)
    return TensorDataset(audio * mask, mask, labels)


def log_mel(audio: Tensor) -> Tensor:
    """``(N, samples)`` -> ``(N, frames, MELS)`` log-mel energies of non-overlapping ``HOP``-sample frames."""
    frames = audio.unfold(1, HOP, HOP) * torch.hann_window(HOP, periodic=False)
    power = torch.fft.rfft(frames, dim=-1).abs() ** 2  # (N, T, HOP // 2 + 1)
    frequencies = torch.fft.rfftfreq(HOP, d=1 / SAMPLE_RATE)
    mel = 2595 * torch.log10(1 + frequencies / 700)
    edges = torch.linspace(0, float(mel[-1]), MELS + 2)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    filters = torch.clamp(torch.minimum((mel - left) / (centre - left), (right - mel) / (right - centre)), min=0)
    return torch.log(power @ filters.T + 1e-6)


def values_at(history: list[dict[str, Any]], reference: str, layers: list[str], epoch: int) -> dict[str, float]:
    """Layer -> SVCCA to ``reference`` at ``epoch``."""
    return {
        row["layer"]: float(row["value"])
        for row in history
        if row["reference"] == reference and row["metric"] == "svcca" and row["epoch"] == epoch
        if row["layer"] in layers
    }


def short(layer: str) -> str:
    """``model.wav2vec2.encoder.layers.3`` -> ``encoder.layers.3``."""
    return layer.removeprefix("model.wav2vec2.")


@torch.no_grad()
def accuracy(model: SpeechClassifier, data: TensorDataset) -> float:
    """Fraction of correctly classified clips (eval mode; the model's mode is restored)."""
    training = model.training
    model.eval()
    audio, mask, label = data.tensors
    correct = (model(audio, mask).argmax(dim=1) == label).float().mean().item()
    model.train(training)
    return correct


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Then: tensorboard --logdir <root>. Curves: svcca/pretrained/<layer>, svcca/log-mel/<layer>.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="epochs of the tone-frequency task")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="epochs of the pitch-shape task")
    parser.add_argument("--clips", type=int, default=768, help="training clips per task")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, both phases")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--probe-size", type=int, default=160, help="held-out pitch-shape clips in the probe")
    add_run_arguments(
        parser,
        __file__,
        root_help="where TensorBoard events and svcca_history.csv go",
        quick_help="a short run for the tests: 3 + 3 epochs on 256 clips (the table is printed all the same)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Pretrain, fine-tune with the callback, print the table, and return the results (for the tests).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        ``pretrained`` (layer -> SVCCA to the pretrained model at the end), ``mel_before`` / ``mel_after``
        (to the log-mel features at the start and end of fine-tuning), ``noise_floor``, ``accuracy`` and
        ``pretrain_accuracy`` (held-out clips), ``layers``, ``history``, ``log_dir`` and ``csv``.
    """
    args = parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.finetune_epochs, args.clips, args.probe_size = 3, 3, 256, 96
    return run_example(run, args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The body of :func:`main`, on parsed arguments."""
    generator = torch.Generator().manual_seed(args.seed)
    tone_train, tone_test = clips("tone", args.clips, generator), clips("tone", 200, generator)
    shape_train, shape_test = clips("shape", args.clips, generator), clips("shape", 200, generator)

    # 1. Pretrain on the proxy task; a frozen copy is the reference.
    model = SpeechClassifier(num_labels=len(TONES), lr=args.lr)
    trainer(args, args.pretrain_epochs, logger=False).fit(
        model, DataLoader(tone_train, batch_size=args.batch_size, shuffle=True)
    )
    pretrain_accuracy = accuracy(model, tone_test)
    pretrained = copy.deepcopy(model)

    # 2. A new output layer for the new task; fine-tune everything while comparing layers frame by frame.
    model.model.classifier = nn.Linear(model.model.classifier.in_features, len(SHAPES))
    audio, mask, _ = shape_test[: args.probe_size]
    callback = SVCCACallback(
        probe={"input_values": audio, "attention_mask": mask},  # model(**probe); attention_mask = padding
        layers=list(LAYERS),
        reference={"pretrained": pretrained, "log-mel": log_mel(audio)},
    )
    fine_tuning = trainer(
        args, args.finetune_epochs, callbacks=[callback], logger=TensorBoardLogger(args.root, name=f"seed{args.seed}")
    )
    fine_tuning.fit(model, DataLoader(shape_train, batch_size=args.batch_size, shuffle=True))

    new_accuracy = accuracy(model, shape_test)
    layers = callback.layers
    columns = {
        "log-mel, pretrained": values_at(callback.history, "log-mel", layers, 0),
        "log-mel, fine-tuned": last_values(callback.history, "log-mel", layers),
        "pretrained, at end": last_values(callback.history, "pretrained", layers),
        "noise floor": last_values(callback.history, "baseline", layers),
    }
    log_dir = Path(fine_tuning.log_dir)

    print(f"\npretrained (tone frequency, 6 classes): accuracy {pretrain_accuracy:.3f} on {len(tone_test)} clips")
    print(f"fine-tuned (pitch shape, 3 classes): accuracy {new_accuracy:.3f} on {len(shape_test)} clips\n")
    print(format_columns(TABLE_TITLE, layers, columns, label="layer", names={layer: short(layer) for layer in layers}))
    print(
        f"(after {args.finetune_epochs} epochs of fine-tuning; datapoints are the probe's real 20 ms frames, padding"
        " left out;\n 'noise floor': the same measure with the datapoints shuffled)\n"
    )
    print(f"TensorBoard: tensorboard --logdir {args.root}")
    print(f"history CSV: {log_dir / HISTORY_FILE}")
    return {
        "pretrained": columns["pretrained, at end"],
        "mel_before": columns["log-mel, pretrained"],
        "mel_after": columns["log-mel, fine-tuned"],
        "noise_floor": columns["noise floor"],
        "accuracy": new_accuracy,
        "pretrain_accuracy": pretrain_accuracy,
        "layers": layers,
        "history": callback.history,
        "log_dir": log_dir,
        "csv": log_dir / HISTORY_FILE,
    }


if __name__ == "__main__":
    main()
