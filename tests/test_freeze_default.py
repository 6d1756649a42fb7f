"""``FreezePolicy()``'s default rule on real fits, and what a freeze's log line reports.

The default rule (``mode="movement"``) freezes a layer once its recent movement is small against its movement
since the start. From scratch under a cosine learning rate it freezes the lowest layer before the end of a short
fit; under LoRA it leaves the adapted layers alone while they move, and a layer with nothing trainable (the
embeddings) freezes without being reported as a freeze.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_svcca import FreezePolicy, SVCCACallback, SVCCAMonitorWarning
from lightning_svcca.freezing.blocks import Block, adapter_parameters, freeze_message

from digits_models import DigitsCNN, digits_tensors
from helpers import console_lines, quiet_trainer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class CosineDigitsCNN(DigitsCNN):
    """The digits CNN under SGD with a cosine learning rate over the fit (a sound from-scratch baseline)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


class LoraBert(pl.LightningModule):
    """A 2-layer BERT from its config with PEFT LoRA on query and value (rank 4), and a trained head."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        bert = transformers.BertModel(config, add_pooling_layer=False)
        self.bert = peft.get_peft_model(bert, peft.LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.0))
        self.head = nn.Linear(32, 2)

    @property
    def layers(self) -> list[str]:
        """The embeddings, the encoder layers and the head (PEFT's wrapping prefixes the names)."""
        names = [name for name, _ in self.named_modules()]
        encoder = [name for name in names if name.rsplit(".", 2)[-2:-1] == ["layer"]]
        return [next(name for name in names if name.endswith(".embeddings")), *encoder, "head"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=x).last_hidden_state[:, 0])

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)


def _counting_task(count: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences ([CLS] = 0 first) labelled by whether token 5 occurs more often than token 7."""
    x = torch.randint(1, 16, (count, 16), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0
    return x, ((x == 5).sum(1) > (x == 7).sum(1)).long()


def _fit(tmp_path, model, policy, loader, probe, layers, epochs, caplog=None, callbacks=(), ckpt_path=None, **kwargs):
    callback = SVCCACallback(probe=probe, layers=layers, reference=["previous"], freeze=policy)
    trainer = quiet_trainer(tmp_path, [callback, *callbacks], max_epochs=epochs, **kwargs)
    lines = console_lines(callback, caplog.handler) if caplog is not None else contextlib.nullcontext()
    with lines, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    return callback


def _froze_messages(caplog) -> list[str]:
    return list(dict.fromkeys(r.getMessage() for r in caplog.records if "froze layer" in r.getMessage()))


def test_the_default_finds_the_lowest_layer_converged_from_scratch_within_twelve_epochs(tmp_path, caplog):
    """Found at the twelfth, the fit's last measurement: held with a line, not frozen (a freeze there saves
    nothing); a fit resumed for two more epochs freezes it at its first measurement."""
    pl.seed_everything(0, verbose=False)
    (x, y), (probe, _), _ = digits_tensors()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    layers = ["relu1", "relu2", "relu3", "fc2"]
    saved = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = _fit(
        tmp_path, CosineDigitsCNN(), FreezePolicy(), loader, probe, layers, 12, caplog,
        limit_train_batches=8, callbacks=[saved], enable_checkpointing=True,
    )  # fmt: skip
    # a record can reach caplog twice (the callback's logger and the root one), as _froze_messages allows for
    held = list(dict.fromkeys(r.getMessage() for r in caplog.records if "would freeze at epoch 12" in r.getMessage()))
    assert callback.frozen == {} and len(held) == 1 and "'relu1'" in held[0] and "saves nothing" in held[0], held
    # the monitor measured both sides of the relative movement: the growing lag and the first snapshot
    references = {row["reference"] for row in callback.history}
    assert {"lag0.5t", "initial"} <= references
    resumed = _fit(
        tmp_path / "b", CosineDigitsCNN(), FreezePolicy(), loader, probe, layers, 14,
        limit_train_batches=8, ckpt_path=tmp_path / "ckpt" / "last.ckpt",
    )  # fmt: skip
    assert resumed.frozen.get("relu1") == 13 and "fc2" not in resumed.frozen, resumed.frozen
    # the monitor measured both sides of the relative movement: the growing lag and the first snapshot
    references = {row["reference"] for row in callback.history}
    assert {"lag0.5t", "initial"} <= references


def test_a_threshold_above_a_steady_pace_still_waits_for_a_second_measurement(tmp_path):
    # rho = 1 at the first epoch by definition: 1.5 would freeze every layer there if that epoch were judged
    pl.seed_everything(0, verbose=False)
    (x, y), (probe, _), _ = digits_tensors()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    layers = ["relu1", "relu2", "relu3", "fc2"]
    policy = FreezePolicy(movement_threshold=1.5, task=None)  # the rule alone: 4 batches an epoch learn little
    callback = _fit(tmp_path, CosineDigitsCNN(), policy, loader, probe, layers, 3, limit_train_batches=4)
    assert callback.frozen and min(callback.frozen.values()) >= 2
    assert {row["epoch"] for row in callback.history if row["reference"] == "initial"} >= {1, 2}


@pytest.mark.parametrize(("epochs", "says"), [(2, "nothing before the end"), (3, "for the last 1 of its 3 epochs")])
def test_a_fit_too_short_for_the_movement_rule_says_so(tmp_path, epochs, says):
    (x, y), (probe, _), _ = digits_tensors()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    layers = ["relu1", "relu2", "fc2"]
    fit = {"max_epochs": epochs, "limit_train_batches": 2, "accelerator": "cpu", "logger": False}
    quiet = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    callback = SVCCACallback(probe=probe, layers=layers, freeze=FreezePolicy())
    with pytest.warns(
        SVCCAMonitorWarning,
        match=f"gets {epochs} measurement.s. after training.*can freeze {says}.*every_n_train_steps",
    ):
        pl.Trainer(default_root_dir=tmp_path, callbacks=[callback], **fit, **quiet).fit(DigitsCNN(), loader)
    by_steps = SVCCACallback(probe=probe, layers=layers, freeze=FreezePolicy(), every_n_train_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(default_root_dir=tmp_path, callbacks=[by_steps], **fit, **quiet).fit(DigitsCNN(), loader)
    assert not [w for w in caught if "judges a layer from its second measurement" in str(w.message)]


def test_the_default_leaves_lora_layers_alone_while_they_move(tmp_path, caplog):
    pl.seed_everything(0, verbose=False)
    x, y = _counting_task()
    model = LoraBert()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    with caplog.at_level(logging.DEBUG):
        callback = _fit(tmp_path, model, FreezePolicy(), loader, x[:128], model.layers, 4, caplog)
    embeddings, *encoder, _ = model.layers
    # nothing of the embeddings trains under LoRA: they count as frozen for the order, reported as no freeze
    assert callback.frozen == {embeddings: 0}  # decided at the first measurement, before training
    assert not any(layer in callback.frozen for layer in encoder)
    assert _froze_messages(caplog) == []
    assert all(p.requires_grad for name, p in model.named_parameters() if "lora_" in name)


def test_a_freeze_counts_only_trainable_tensors_and_says_when_it_stops_adapters(tmp_path, caplog):
    pl.seed_everything(0, verbose=False)
    x, y = _counting_task(64)
    model = LoraBert()
    embeddings, first, *_ = model.layers
    policy = FreezePolicy(mode="schedule", schedule={embeddings: 1, first: 1})
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    with caplog.at_level(logging.INFO):
        callback = _fit(tmp_path, model, policy, loader, x[:32], model.layers, 2, caplog)
    assert callback.frozen == {embeddings: 1, first: 1}
    # layer 0 holds 16 tensors frozen by PEFT and 4 LoRA tensors: only the 4 are counted, and named as adapters
    assert _froze_messages(caplog) == [
        f"froze layer {first!r} at epoch 1 (4 trainable parameter tensors, all of them PEFT adapter weights: its"
        " adapters stop training): scheduled for epoch 1"
    ]


def test_adapter_parameters_are_found_by_duck_typing_and_by_name():
    model = LoraBert()
    names = [name for name, _ in model.named_parameters()]
    adapters = adapter_parameters(model, names)
    assert adapters and all(".lora_A." in name or ".lora_B." in name for name in adapters)
    plain = nn.Sequential(nn.Linear(2, 2))
    assert adapter_parameters(plain, ["0.weight", "0.bias", "x.lora_magnitude_vector"]) == ["x.lora_magnitude_vector"]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    assert freeze_message(frozen, "fc", Block(parameters=["weight", "bias"]), 3, "why") is None
    one = nn.Linear(2, 2)
    one.bias.requires_grad_(False)
    assert freeze_message(one, "fc", Block(parameters=["weight", "bias"]), 3, "why") == (
        "froze layer 'fc' at epoch 3 (1 trainable parameter tensor): why"
    )


def test_the_growing_lag_keeps_every_snapshot_a_later_measurement_reaches():
    from lightning_svcca.core.timeline import Timeline, fraction_lag

    full = Timeline()
    for point in range(41):
        full.add(point, epoch=point, step=10 * point)
    assert [fraction_lag(t, 0.25) for t in (1, 2, 3, 4, 6, 10, 40)] == [1, 1, 1, 1, 2, 3, 10]
    assert full.lagged_by_fraction(40, 0.25) == 30 and full.lagged_by_fraction(0, 0.25) is None
    timeline = Timeline()
    for point in range(40):  # as the monitor prunes: right after measuring `point`
        timeline.add(point, epoch=point, step=10 * point)
        kept = timeline.reachable_by_fraction(point, 0.25)
        later = {full.lagged_by_fraction(t, 0.25) for t in range(point + 1, 41)}
        assert later & set(timeline.measured) <= kept and len(kept) <= fraction_lag(point + 1, 0.25)
