"""Freeze training: the policy's decisions, what a freeze covers, and that frozen layers really stay frozen."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_svcca import (
    Convergence,
    FreezePolicy,
    LinearSchedule,
    Movement,
    PrefixCacheOptions,
    Schedule,
    SVCCACallback,
    SVCCAMonitor,
    SVCCAMonitorWarning,
)
from lightning_svcca.freezing import Evidence, FreezeDecision
from lightning_svcca.freezing.blocks import freeze_blocks
from lightning_svcca.freezing.freezer import Freezer

from digits_models import DigitsCNN, digits_tensors
from helpers import quiet_trainer

LAYERS = ["relu1", "relu2", "relu3", "fc2"]


# ---------------------------------------------------------------------------------------------------------------
# The policy, without a Trainer
# ---------------------------------------------------------------------------------------------------------------


CONVERGED = Convergence(threshold=0.9)


@pytest.mark.parametrize(
    ("policy", "similarities", "expected"),
    [
        # bottom-up: relu2 has converged but relu1 below it has not, so nothing freezes
        (FreezePolicy(CONVERGED), {"a": 0.5, "b": 0.95, "c": 0.95}, []),
        (FreezePolicy(CONVERGED), {"a": 0.95, "b": 0.95, "c": 0.5}, ["a", "b"]),
        # any order: every converged layer below the kept top
        (FreezePolicy(CONVERGED, order="any"), {"a": 0.5, "b": 0.95, "c": 0.95}, ["b", "c"]),
        # keep_last=2 protects the two top layers
        (FreezePolicy(CONVERGED, keep_last=2), {"a": 0.95, "b": 0.95, "c": 0.95}, ["a", "b"]),
        # max_frozen bounds the count
        (FreezePolicy(CONVERGED, max_frozen=1), {"a": 0.95, "b": 0.95, "c": 0.95}, ["a"]),
        # min_epochs: too early
        (FreezePolicy(CONVERGED, min_epochs=11), {"a": 0.95, "b": 0.95, "c": 0.95}, []),
    ],
)
def test_convergence_decisions(policy, similarities, expected):
    decisions = policy.decide(Evidence(10, ["a", "b", "c", "d"], similarities=similarities)).decisions
    assert [decision.layer for decision in decisions] == expected
    assert all("0.95" in decision.reason for decision in decisions)


def _decide(policy: FreezePolicy, streaks: dict[str, int] | None = None, **evidence) -> list[FreezeDecision]:
    """The decisions at one measurement; ``streaks`` (when given) takes the updated counts, as the monitor does."""
    outcome = policy.decide(Evidence(**evidence), streaks)
    if streaks is not None:
        streaks.clear()
        streaks.update(outcome.streaks)
    return outcome.decisions


def test_patience_counts_consecutive_measurements():
    policy = FreezePolicy(CONVERGED, patience=2, keep_last=0)
    streaks: dict[str, int] = {}
    assert _decide(policy, streaks, epoch=5, layers=["a"], similarities={"a": 0.95}) == []
    assert _decide(policy, streaks, epoch=6, layers=["a"], similarities={"a": 0.5}) == []  # streak broken
    assert _decide(policy, streaks, epoch=7, layers=["a"], similarities={"a": 0.95}) == []
    assert [d.layer for d in _decide(policy, streaks, epoch=8, layers=["a"], similarities={"a": 0.95})] == ["a"]


def test_decide_returns_the_streaks_and_leaves_the_callers_alone():
    policy = FreezePolicy(CONVERGED, patience=2, keep_last=0)
    streaks = {"a": 1}
    outcome = policy.decide(Evidence(5, ["a"], similarities={"a": 0.95}), streaks)
    assert streaks == {"a": 1} and outcome.streaks == {"a": 2} and [d.layer for d in outcome.decisions] == ["a"]


def test_noise_aware_judges_the_excess_over_the_shuffled_baseline():
    policy = FreezePolicy(Convergence(threshold=0.9, noise_aware=True), keep_last=0)
    # 0.95 looks converged, but with a baseline of 0.8 it is only (0.95 - 0.8) / 0.2 = 0.75 of the way
    assert _decide(policy, epoch=5, layers=["a"], similarities={"a": 0.95}, baselines={"a": 0.8}) == []
    [decision] = _decide(policy, epoch=5, layers=["a"], similarities={"a": 0.99}, baselines={"a": 0.8})
    assert decision.layer == "a" and "above the shuffled baseline 0.8000" in decision.reason


def _movement(recent_moved: float, total_moved: float) -> tuple[float, float]:
    """``(s(t, t - lag), s(t, 0))`` for a layer that moved ``recent_moved`` lately and ``total_moved`` in all."""
    return 1.0 - recent_moved, 1.0 - total_moved


def _moved(epoch: int, recent_moved: float, total_moved: float, **more) -> dict:
    """Evidence keywords for one layer ``a`` that moved ``recent_moved`` lately and ``total_moved`` in all."""
    recent, total = _movement(recent_moved, total_moved)
    return {"epoch": epoch, "layers": ["a"], "similarities": {"a": recent}, "initial": {"a": total}, **more}


def test_the_default_rule_judges_recent_movement_against_movement_since_the_start():
    policy = FreezePolicy(keep_last=0)
    assert policy.rule == Movement(threshold=0.75, lag_fraction=0.5)
    # t = 8: lag = floor(0.5 * 8 + 0.5) = 4; a steady pace moves (4/8)^2 = 1/4 of the total in the last 4
    assert _decide(policy, **_moved(8, 0.01 / 4, 0.01)) == []
    [decision] = _decide(policy, **_moved(8, 0.01 / 16, 0.01))
    assert "relative movement 0.250 < 0.75" in decision.reason and "over the last 4 measurement(s)" in decision.reason
    # scale-free: a LoRA-like layer that moved 1e-4 in all reads the same as one that moved 1e-2
    assert [d.layer for d in _decide(policy, **_moved(8, 1e-4 / 16, 1e-4))] == ["a"]
    # the lag counts measurements when given (every k epochs, or by steps): t = 4 -> lag 2, r = 1/4 is steady
    assert _decide(policy, **_moved(8, 0.01 / 4, 0.01, measurement=4)) == []


def test_a_layer_with_nothing_trainable_counts_as_converged_and_unmeasurable_layers_wait():
    policy = FreezePolicy()
    similarities = initial = {"emb": 1.0, "a": 0.99, "b": 0.8}  # at t = 1 the lagged snapshot is the first
    outcome = policy.decide(Evidence(1, ["emb", "a", "b"], similarities=similarities, initial=initial, idle=["emb"]))
    # t = 1: every moving layer is at its steady pace by definition (rho = 1); the one with nothing trainable is ready
    decisions = outcome.decisions
    assert [d.layer for d in decisions] == ["emb"] and "nothing of its own trains" in decisions[0].reason
    assert outcome.streaks == {"emb": 1, "a": 0, "b": 0}
    assert _decide(policy, epoch=1, layers=["a", "b"], similarities={"a": 0.99}) == []  # no initial value: no decision
    # a movement below MIN_MOVEMENT is snapshot rounding (a LoRA adapter's first steps): its ratio is not judged
    assert _decide(policy, **_moved(8, 1e-8, 5e-7)) == []


def test_the_first_measurement_is_not_judged_even_under_a_threshold_above_one():
    # at t = 1 the lagged snapshot is the first one: rho = 1 by definition, whatever the layer did
    policy = FreezePolicy(Movement(threshold=1.5), keep_last=0)
    streaks: dict[str, int] = {}
    assert _decide(policy, streaks, **_moved(1, 0.3, 0.3)) == []
    assert streaks == {"a": 0}
    # t = 2, lag 1: the second epoch moved a quarter of the total, rho = 0.25 * 2**2 = 1 < 1.5
    [decision] = _decide(policy, streaks, **_moved(2, 0.3 / 4, 0.3))
    assert decision.layer == "a" and "relative movement 1.000 < 1.5" in decision.reason


def test_movement_patience_and_min_epochs():
    policy = FreezePolicy(patience=2, min_epochs=3, keep_last=0)
    streaks: dict[str, int] = {}
    quiet = {"layers": ["a"], "similarities": {"a": 1.0 - 1e-6}, "initial": {"a": 0.9}}
    outcome = policy.decide(Evidence(2, **quiet), streaks)
    assert outcome.decisions == [] and "freezing starts at epoch 3" not in outcome.notes["a"]  # patience: 1 of 2
    streaks = dict(outcome.streaks)
    assert _decide(policy, dict(streaks), epoch=3, **quiet) != []
    early = policy.decide(Evidence(2, **quiet), streaks)  # ready, but before min_epochs: a note says so
    assert early.decisions == [] and early.notes["a"].endswith("freezing starts at epoch 3")


def test_linear_schedule_places_layer_i_at_i_over_l_of_training():
    policy = FreezePolicy(LinearSchedule(), keep_last=0)
    assert policy.freeze_epochs(["a", "b", "c", "d"], 20) == {"a": 5, "b": 10, "c": 15, "d": 20}
    assert [d.layer for d in _decide(policy, epoch=10, layers=["a", "b", "c", "d"], max_epochs=20)] == ["a", "b"]


def test_scheduled_freezes_give_their_reason_in_plain_words():
    schedule = FreezePolicy(Schedule({"a": 1}), keep_last=0)
    assert [d.reason for d in _decide(schedule, epoch=1, layers=["a"])] == ["scheduled for epoch 1"]
    linear = FreezePolicy(LinearSchedule())
    assert [d.reason for d in _decide(linear, epoch=2, layers=["a", "b"], max_epochs=4)] == [
        "scheduled for epoch 2 by the linear schedule"
    ]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: FreezePolicy(mode="sometimes"), "mode must be one of"),
        (lambda: PrefixCacheOptions(max_bytes=-1), "max_bytes must be >= 0 or None"),
        (lambda: FreezePolicy(metric="cosine"), "metric must be one of"),
        (lambda: Convergence(threshold=1.5), r"threshold must be in \(0, 1\]"),
        (lambda: Convergence(lag=0), "lag must be >= 1"),
        (lambda: Movement(lag_fraction=0.0), r"lag_fraction must be in \(0, 1\]"),
        (lambda: Movement(threshold=0.0), "threshold must be > 0"),
        (lambda: FreezePolicy(order="top_down"), "order must be one of"),
        (lambda: FreezePolicy(patience=0), "patience must be >= 1"),
        (lambda: Schedule({}), "needs epochs="),
    ],
)
def test_policy_and_rules_reject_bad_values(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_a_rule_given_by_name_is_refused_with_the_way_to_name_it():
    with pytest.raises(TypeError, match="must be a freeze rule"):
        FreezePolicy("convergence")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shorthand", "rule"),
    [
        ({}, Movement()),
        ({"mode": "movement", "movement_threshold": 0.5, "lag_fraction": 0.25}, Movement(0.5, 0.25)),
        ({"mode": "convergence"}, Convergence()),
        ({"mode": "convergence", "threshold": 0.5, "lag": 2, "noise_aware": True}, Convergence(0.5, 2, True)),
        ({"mode": "linear"}, LinearSchedule()),
        ({"mode": "schedule", "schedule": {"a": 1}}, Schedule({"a": 1})),
    ],
)
def test_the_old_keywords_are_a_shorthand_for_the_rule(shorthand, rule):
    assert FreezePolicy(**shorthand).rule == rule
    assert FreezePolicy(**shorthand) == FreezePolicy(rule)


def test_the_cache_keywords_are_a_shorthand_for_its_options():
    assert FreezePolicy().cache is None and not FreezePolicy().cache_outputs
    assert FreezePolicy(cache_outputs=True).cache == PrefixCacheOptions()
    shorthand = FreezePolicy(cache_outputs=True, cache_max_bytes=None, cache_key="index", cache_device="cpu")
    assert shorthand == FreezePolicy(cache=PrefixCacheOptions(max_bytes=None, key="index", device="cpu"))
    assert shorthand.cache_outputs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cache_max_bytes": -1, "cache_outputs": True}, "max_bytes must be >= 0 or None"),
        ({"cache_key": "index"}, r"\['cache_key'\] only apply with cache_outputs=True"),
        ({"cache_outputs": True, "cache": PrefixCacheOptions()}, "not both"),
        ({"mode": "convergence", "threshold": 1.5}, r"threshold must be in \(0, 1\]"),
        ({"mode": "convergence", "lag": 0}, "lag must be >= 1"),
        ({"lag": 2}, r"\['lag'\] set for mode='movement'.*mode='convergence'"),
        ({"threshold": 0.9}, r"\['threshold'\] set for mode='movement'"),
        ({"noise_aware": True}, r"\['noise_aware'\] set for mode='movement'"),
        ({"mode": "convergence", "lag_fraction": 0.3}, r"\['lag_fraction'\] set for mode='convergence'"),
        ({"lag_fraction": 0.0}, r"lag_fraction must be in \(0, 1\]"),
        ({"movement_threshold": 0.0}, "threshold must be > 0"),
        ({"mode": "schedule"}, "needs schedule="),
        ({"schedule": {"a": 1}}, r"\['schedule'\] set for mode='movement'.*mode='schedule'"),
        ({"rule": Convergence(), "lag": 2}, "give rule= or the shorthand"),
    ],
)
def test_the_shorthand_rejects_what_the_policy_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreezePolicy(**kwargs)


def test_callback_checks_the_policy_against_its_cadence():
    with pytest.raises(ValueError, match="multiple of every_n_epochs"):
        SVCCACallback(probe=torch.zeros(4, 3), freeze=FreezePolicy(mode="convergence", lag=3), every_n_epochs=2)
    with pytest.raises(ValueError, match="does not\\s+measure; add it"):
        SVCCACallback(probe=torch.zeros(4, 3), freeze=FreezePolicy(metric="pwcca"), metrics=["svcca"])
    with pytest.raises(ValueError, match="noise_aware=True\\) reads the shuffled baseline"):
        freeze = FreezePolicy(Convergence(lag=1, noise_aware=True))
        SVCCACallback(probe=torch.zeros(4, 3), freeze=freeze, baseline=False)


# ---------------------------------------------------------------------------------------------------------------
# What a freeze covers
# ---------------------------------------------------------------------------------------------------------------


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(4, 4), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(4, 4), nn.ReLU()
        self.head = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(self.fc1(x)))  # fc1 runs again in act2's block
        return self.head(x)


def test_blocks_follow_the_forward_pass():
    model = DigitsCNN()
    completion = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool", "fc1", "relu3", "fc2", ""]
    blocks = freeze_blocks(completion, ["relu1", "relu3"], model)
    # a monitored ReLU freezes the conv and BatchNorm before it; the next block starts after it
    assert blocks["relu1"].parameters == ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"]
    assert blocks["relu1"].norm_modules == ["bn1"]
    assert blocks["relu3"].parameters == [
        "conv2.weight",
        "conv2.bias",
        "bn2.weight",
        "bn2.bias",
        "fc1.weight",
        "fc1.bias",
    ]
    # fc2 runs after the last monitored layer: never frozen
    assert all("fc2" not in name for block in blocks.values() for name in block.parameters)


def test_shared_weights_belong_to_the_last_block_and_unused_weights_to_none():
    model = _Shared()
    completion = ["fc1", "act1", "fc1", "fc2", "act2", "head"]
    blocks = freeze_blocks(completion, ["act1", "act2"], model)
    assert blocks["act1"].parameters == []
    assert sorted(blocks["act2"].parameters) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert all("unused" not in name for block in blocks.values() for name in block.parameters)


def test_freezer_turns_gradients_off_and_keeps_batchnorm_in_eval():
    model = DigitsCNN()
    blocks = freeze_blocks(["conv1", "bn1", "relu1"], ["relu1"], model)
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    freezer = Freezer()
    freezer.freeze(model, "relu1", blocks["relu1"])
    assert model.conv1.weight.grad is None and not model.conv1.weight.requires_grad
    assert not model.bn1.training
    model.train()  # what Lightning does at every epoch start
    freezer.keep_norms_in_eval(model)
    assert not model.bn1.training and model.bn2.training


def test_frozen_norms_are_resolved_once_per_model_not_per_batch(monkeypatch):
    from lightning_svcca.freezing import freezer as freezer_module

    model, other = DigitsCNN(), DigitsCNN()
    blocks = freeze_blocks(["conv1", "bn1", "relu1"], ["relu1"], model)
    freezer = Freezer()
    freezer.freeze(model, "relu1", blocks["relu1"])
    calls = []
    resolve = freezer_module.modules_by_name
    monkeypatch.setattr(freezer_module, "modules_by_name", lambda m: calls.append(m) or resolve(m))
    for _ in range(50):
        model.train()
        freezer.start_batch(model, epoch=1)
        assert not model.bn1.training
    assert calls == []  # resolved when the layer froze, not walked again at every batch
    other.train()
    freezer.start_batch(other, epoch=1)  # another model (a new fit): its own modules, not the first one's
    assert not other.bn1.training and other.bn2.training
    assert calls == [other]


# ---------------------------------------------------------------------------------------------------------------
# Real training runs
# ---------------------------------------------------------------------------------------------------------------


class _Recorder(pl.Callback):
    """Snapshots parameters and BatchNorm statistics right after the freeze, and watches gradients."""

    def __init__(self, freeze_epoch: int):
        self.freeze_epoch = freeze_epoch
        self.after_freeze: dict[str, torch.Tensor] | None = None
        self.gradients_seen: set[str] = set()

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.freeze_epoch:
            self.after_freeze = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_after_backward(self, trainer, pl_module):
        if trainer.current_epoch >= self.freeze_epoch:
            self.gradients_seen |= {name for name, p in pl_module.named_parameters() if p.grad is not None}


def _fit(tmp_path, model, policy, *, epochs=4, callbacks=(), ckpt_path=None, layers=LAYERS, **trainer_kwargs):
    (x_train, y_train), (x_probe, _), _ = digits_tensors()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
    callback = SVCCACallback(probe=x_probe, layers=layers, reference=["previous"], freeze=policy)
    settings = {"max_epochs": epochs, "limit_train_batches": 8, "enable_checkpointing": True, **trainer_kwargs}
    trainer = quiet_trainer(tmp_path, [callback, *callbacks], **settings)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return callback, trainer


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_parameters_never_change_bit_for_bit(tmp_path, optimizer, set_to_none):
    """SGD with momentum and weight decay, AdamW with weight decay, either zero_grad: frozen weights stay put."""
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN(optimizer=optimizer, set_to_none=set_to_none)
    recorder = _Recorder(freeze_epoch=1)
    callback, _ = _fit(tmp_path, model, FreezePolicy(mode="schedule", schedule={"relu1": 1}), callbacks=[recorder])
    assert callback.frozen == {"relu1": 1}
    final = model.state_dict()
    for name in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert torch.equal(final[name], recorder.after_freeze[name]), name
    # the layers above kept training
    assert not torch.equal(final["fc1.weight"], recorder.after_freeze["fc1.weight"])
    assert not torch.equal(final["bn2.running_mean"], recorder.after_freeze["bn2.running_mean"])
    # autograd skipped them: no gradient was ever computed for a frozen parameter
    assert recorder.gradients_seen.isdisjoint({"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"})
    assert "fc1.weight" in recorder.gradients_seen


def test_convergence_freezing_is_bottom_up_and_reported(tmp_path):
    pl.seed_everything(0, verbose=False)
    # threshold 0.5 at lag 1: everything "converges" at once, so the order rule alone decides what freezes
    policy = FreezePolicy(mode="convergence", lag=1, threshold=0.5, keep_last=2, task=None)  # the order alone
    callback, _ = _fit(tmp_path, DigitsCNN(), policy, epochs=3)
    assert callback.frozen == {"relu1": 1, "relu2": 1}
    frozen_rows = [r for r in callback.history if r["reference"] == "frozen"]
    assert {(r["epoch"], r["layer"]) for r in frozen_rows if r["value"] == 1.0} == {
        (epoch, layer) for epoch in (1, 2, 3) for layer in ("relu1", "relu2")
    }
    assert {r["value"] for r in frozen_rows if r["layer"] == "relu3"} == {0.0}


def test_soft_freeze_keeps_parameters_fixed_where_requires_grad_cannot_change(tmp_path, monkeypatch):
    monkeypatch.setattr("lightning_svcca.integrations.callback.is_hard_freeze_supported", lambda strategy: False)
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    recorder = _Recorder(freeze_epoch=1)
    with pytest.warns(UserWarning, match="no compute is\\s+saved"):
        _fit(tmp_path, model, FreezePolicy(mode="schedule", schedule={"relu1": 1}), callbacks=[recorder])
    assert model.conv1.weight.requires_grad  # soft: gradients are computed, then dropped
    assert torch.equal(model.conv1.weight, recorder.after_freeze["conv1.weight"])


def test_resume_keeps_frozen_layers_frozen_and_history_complete(tmp_path):
    pl.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    policy = FreezePolicy(mode="schedule", schedule={"relu1": 1, "relu2": 2})
    first_model = DigitsCNN()
    first, _ = _fit(tmp_path / "a", first_model, policy, epochs=3, callbacks=[checkpoints])
    weights_at_freeze = first_model.conv1.weight.detach().clone()

    # a freeze decided in the epoch that a checkpoint is saved is in that checkpoint
    saved = torch.load(tmp_path / "ckpt" / "epoch=1-step=16.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("SVCCACallback"))
    assert state["frozen"] == {"relu1": 1, "relu2": 2}
    assert any(name.startswith("conv2") for name in state["freezer"]["parameters"]["relu2"])

    resumed_model = DigitsCNN()
    resumed, trainer = _fit(
        tmp_path / "b",
        resumed_model,
        policy,
        epochs=5,
        ckpt_path=tmp_path / "ckpt" / "epoch=1-step=16.ckpt",
    )
    assert resumed.frozen == {"relu1": 1, "relu2": 2}
    assert not resumed_model.conv1.weight.requires_grad and not resumed_model.conv2.weight.requires_grad
    assert torch.equal(resumed_model.conv1.weight, weights_at_freeze)
    keys = [(r["epoch"], r["layer"], r["reference"], r["metric"]) for r in resumed.history]
    assert len(keys) == len(set(keys))
    assert sorted({r["epoch"] for r in resumed.history}) == [0, 1, 2, 3, 4, 5]
    # the restored history is the first run's, row for row, up to the checkpoint
    restored = [r for r in resumed.history if r["epoch"] <= 2]
    assert restored == [r for r in first.history if r["epoch"] <= 2]
    assert trainer.current_epoch == 5


def test_frozen_state_is_plain_and_round_trips(digits_cnn):
    def monitor():
        return SVCCAMonitor(
            digits_cnn(), probe=torch.zeros(4, 1, 8, 8), layers=LAYERS, freeze=FreezePolicy(mode="convergence", lag=1)
        )

    first = monitor()
    first.freezing.frozen = {"relu1": 3}
    first.freezing.streaks = {"relu1": 2}
    first.freezing.freezer.parameters = {"relu1": ["conv1.weight"]}
    state = copy.deepcopy(first.state_dict())
    other = monitor()
    other.load_state_dict(state)
    assert other.frozen == {"relu1": 3} and other.freezing.streaks == {"relu1": 2}
    assert other.freezing.freezer.parameters == {"relu1": ["conv1.weight"]}
    # the callback hands a checkpoint's state to the monitor it builds for the fit
    callback = SVCCACallback(
        probe=torch.zeros(4, 1, 8, 8), layers=LAYERS, freeze=FreezePolicy(mode="convergence", lag=1)
    )
    callback.load_state_dict(state)
    assert callback.frozen == {"relu1": 3} and callback.state_dict()["streaks"] == {"relu1": 2}
    # older checkpoints without the newer keys still load
    monitor().load_state_dict({"history": []})


# ---------------------------------------------------------------------------------------------------------------
# Policy safety
# ---------------------------------------------------------------------------------------------------------------


def test_a_policy_that_would_freeze_every_parameter_stops_one_short(tmp_path):
    """keep_last=0 with the output layer monitored: before, the next step died in autograd; now fc2 keeps training."""
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    policy = FreezePolicy(mode="schedule", schedule=dict.fromkeys(LAYERS, 1), keep_last=0)
    with pytest.warns(SVCCAMonitorWarning, match="would freeze every trainable parameter at layer 'fc2'; it stops one"):
        callback, trainer = _fit(tmp_path, model, policy, epochs=3)
    assert callback.frozen == {"relu1": 1, "relu2": 1, "relu3": 1}
    assert trainer.current_epoch == 3  # the fit ran to the end
    assert model.fc2.weight.requires_grad and not model.fc1.weight.requires_grad


def test_a_layer_without_parameters_of_its_own_is_not_reported_as_a_freeze(tmp_path, caplog):
    """bn1 takes conv1 and bn1; relu1 right after it owns nothing: it counts as frozen (for bottom-up order) but
    no freeze is logged for it."""
    pl.seed_everything(0, verbose=False)
    layers = ["bn1", "relu1", "relu2", "fc2"]
    policy = FreezePolicy(mode="schedule", schedule={"bn1": 1, "relu1": 1, "relu2": 2})
    logger = SVCCACallback(probe=torch.zeros(2, 1, 8, 8))._logger()  # Lightning's logger does not propagate
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger=logger.name):
            callback, _ = _fit(tmp_path, DigitsCNN(), policy, epochs=3, layers=layers)
    finally:
        logger.removeHandler(caplog.handler)
    assert callback.frozen == {"bn1": 1, "relu1": 1, "relu2": 2}
    # each message once, whether or not another test has made Lightning's logger propagate to caplog's root handler
    froze = list(
        dict.fromkeys(record.getMessage() for record in caplog.records if "froze layer" in record.getMessage())
    )
    assert froze == [
        "froze layer 'bn1' at epoch 1 (4 trainable parameter tensors): scheduled for epoch 1",
        "froze layer 'relu2' at epoch 2 (4 trainable parameter tensors): scheduled for epoch 2",
    ]


def test_the_fine_tuning_preset_is_the_convergence_policy_with_its_documented_settings():
    policy = FreezePolicy.for_fine_tuning()
    assert (policy.rule, policy.patience, policy.keep_last, policy.cache) == (
        Convergence(lag=1),
        2,
        2,
        PrefixCacheOptions(),
    )
    tuned = FreezePolicy.for_fine_tuning(keep_last=1, threshold=0.98)
    assert tuned.keep_last == 1 and tuned.rule == Convergence(threshold=0.98, lag=1)
    assert FreezePolicy.for_fine_tuning(rule=Movement(), cache=None) == FreezePolicy(patience=2, keep_last=2)
    assert FreezePolicy.for_fine_tuning(cache_outputs=False).cache is None
    with pytest.raises(ValueError, match="lag must be >= 1"):
        FreezePolicy.for_fine_tuning(lag=0)
