"""What a plain loop's user is told about freezing: why it waits (each reason once), layers with nothing to train, a
measurement asked for twice in one epoch, and no wrong advice under a LoRA-like model whose head trains nothing."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

from lightning_svcca import FreezePolicy, Schedule, SVCCAMonitor, SVCCAMonitorWarning
from lightning_svcca.freezing.task_signal import TaskGate, TaskVerdict


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 2, (256,))
    x[y == 1] += 1.0  # a separable task: the loss falls
    return x, y


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def _fit(
    model: nn.Module,
    monitor: SVCCAMonitor,
    epochs: int,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float = 0.05,
    after: int = 0,
) -> None:
    """``epochs`` epochs of 8 SGD steps after epoch ``after``, each loss reported, measured after each epoch."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    monitor.start(step=after * 8)
    for epoch in range(after + 1, after + epochs + 1):
        for chunk in range(0, 256, 32):
            loss = nn.functional.cross_entropy(model(x[chunk : chunk + 32]), y[chunk : chunk + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.observe_loss(loss)
        monitor.measure(epoch=epoch, step=epoch * 8)


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


def test_a_plain_loop_reports_its_loss_and_the_gate_says_why_it_waits(caplog):
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(256, 8), torch.randint(0, 2, (256,))  # random labels: the loss cannot fall 10%
    policy = FreezePolicy(movement_threshold=10.0)  # the representations alone would freeze at once
    with caplog.at_level(logging.INFO, logger="lightning_svcca"):
        with SVCCAMonitor(model, probe=x[:128], layers=["1", "3"], freeze=policy, writers=None) as monitor:
            _fit(model, monitor, 5, x, y, lr=1e-3)
    assert monitor.frozen == {}
    assert any("freezing waits: no task progress yet" in line for line in _lines(caplog, "freezing waits"))


def test_a_gate_that_opens_and_closes_by_turns_says_each_reason_once(monkeypatch, caplog):
    turns = iter([False, True] * 10)

    def alternating(self, signal, window):
        allows = next(turns)
        return TaskVerdict(allows, False, "plateau read" if allows else "no task progress yet: made up")

    monkeypatch.setattr(TaskGate, "verdict", alternating)
    x, y = _data()
    model = _model()
    policy = FreezePolicy(movement_threshold=1e-9)  # nothing is ever still enough: the layers keep moving
    with caplog.at_level(logging.INFO, logger="lightning_svcca"):
        with SVCCAMonitor(model, probe=x[:128], layers=["1", "3"], freeze=policy, writers=None) as monitor:
            _fit(model, monitor, 8, x, y)
    waits = _lines(caplog, "freezing waits")
    assert len(waits) == 2, waits  # was one line at every turn: 8
    assert sum("no task progress yet" in line for line in waits) == 1
    assert monitor.frozen == {}


def test_a_layer_frozen_before_the_fit_is_counted_as_frozen_with_one_line(caplog):
    x, y = _data()
    model = _model()
    model[0].requires_grad_(False)  # frozen by an earlier fit, or by the user
    policy = FreezePolicy(Schedule({"1": 1, "3": 2}), keep_last=1)
    with caplog.at_level(logging.INFO, logger="lightning_svcca"):
        with SVCCAMonitor(model, probe=x[:128], layers=["1", "3", "4"], freeze=policy, writers=None) as monitor:
            _fit(model, monitor, 3, x, y)
    counted = _lines(caplog, "as frozen from epoch")
    assert counted == [
        "freezing counts '1' as frozen from epoch 1: it has no trainable parameters of its own (none at all, frozen"
        " before this fit, or a PEFT model's base that trains adapters elsewhere)"
    ]
    assert monitor.frozen == {"1": 1, "3": 2}
    assert any("froze layer '3' at epoch 2" in line for line in _lines(caplog, "froze layer"))
    assert not _lines(caplog, "freezing waits")  # a schedule freezes when planned: it waits for nothing


def test_a_head_with_nothing_trainable_is_not_what_keep_last_keeps(caplog):
    """Adapters train in the hidden layers only: the kept layer is the top one that trains, with no warning."""
    x, y = _data()
    model = _model()
    model[4].requires_grad_(False)  # the head trains nothing, as a LoRA model's head
    policy = FreezePolicy(Schedule({"1": 1, "3": 1, "4": 1}), keep_last=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SVCCAMonitorWarning)  # the old "use keep_last=1 or more", with keep_last=1
        with SVCCAMonitor(model, probe=x[:128], layers=["1", "3", "4"], freeze=policy, writers=None) as monitor:
            _fit(model, monitor, 2, x, y)
    assert monitor.frozen == {"1": 1}
    assert model[2].weight.requires_grad  # '3', the top layer that trains, keeps training


def test_measuring_one_epoch_twice_in_a_plain_loop_says_why_nothing_happened():
    x, y = _data()
    model = _model()
    with SVCCAMonitor(model, probe=x[:128], layers=["1", "3"], writers=None) as monitor:
        _fit(model, monitor, 1, x, y)
        with pytest.warns(SVCCAMonitorWarning, match=r"epoch 1 was measured already .*every_n_train_steps"):
            assert monitor.measure(epoch=1, step=16) == []
        by_steps = SVCCAMonitor(model, probe=x[:128], layers=["1", "3"], writers=None, every_n_train_steps=8)
        with by_steps, warnings.catch_warnings():
            warnings.simplefilter("error", SVCCAMonitorWarning)
            by_steps.start()
            assert by_steps.measure(epoch=1, step=8) and by_steps.measure(epoch=1, step=16)


def test_a_resume_that_drops_the_first_snapshots_says_the_movement_rule_cannot_judge(caplog):
    """Resumed with metrics that need more of each snapshot, the run's snapshots are dropped: without a comparison
    with the first one, the movement rule never judges the layer, nor bottom-up the layers above. It says so."""
    x, y = _data()
    model = _model()
    with SVCCAMonitor(model, probe=x[:128], layers=["1", "3"], freeze=FreezePolicy(), writers=None) as first:
        _fit(model, first, 2, x, y)
        state = first.state_dict()
    changed = SVCCAMonitor(
        model,
        probe=x[:128],
        layers=["1", "3"],
        metrics=("svcca", "linear_cka"),
        freeze=FreezePolicy(task=None),  # the representations alone: the gate's own waiting is another test's
        writers=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the resume's own warnings: the snapshots dropped
        changed.load_state_dict(state)
    with caplog.at_level(logging.INFO, logger="lightning_svcca"), changed:
        _fit(model, changed, 4, x, y, after=2)
    assert any(
        "'1' cannot be judged: it has no comparison with the run's first snapshot" in line
        for line in _lines(caplog, "freezing waits")
    )
