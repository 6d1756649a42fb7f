"""The freeze rules on hand-made evidence, without a policy or a Trainer: what each finds ready, and why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_svcca import Convergence, FreezePolicy, LinearSchedule, Movement, Schedule, SVCCAMonitor
from lightning_svcca.core.timeline import Timeline, fraction_lag
from lightning_svcca.freezing import Evidence
from lightning_svcca.freezing.rules import LaggedSnapshot, relative_movement
from lightning_svcca.freezing.task_signal import TaskVerdict

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_svcca"


def test_movement_reads_the_pace_and_notes_the_layers_still_moving():
    # t = 8, lag 4: a steady pace moved (4/8)^2 = 1/4 of the total lately (rho = 1); a quarter of that: rho = 0.25
    evidence = Evidence(
        8, ["a", "b", "c"], similarities={"a": 1 - 0.01 / 16, "b": 1 - 0.01 / 4}, initial=dict.fromkeys("ab", 0.99)
    )
    found = Movement().readiness(evidence, {"b": 3, "c": 2})
    assert list(found.ready) == ["a"] and found.ready["a"].startswith("relative movement 0.250 < 0.75 for 1")
    assert found.notes["b"].startswith("relative movement 1.000 >= 0.75 (1 - svcca: 2.50e-03 over the last 4")
    assert found.streaks == {"a": 1, "b": 0, "c": 0}  # c was not measured: its streak starts again


def test_movement_reads_its_pace_over_the_epochs_when_measurements_are_unevenly_spaced():
    """Measured at epochs 0, 2, 4, 5, 6: at 6 the lagged snapshot is the latest at least half the run back, epoch 2's
    (3 measurements back). A layer moving at a steady speed has 1 - s = c * (elapsed epochs)**2: 16c lately, 36c in
    all, rho = (16 / 36) * (6 / 4)**2 = 1. Counting measurements (lag 2: epoch 4's snapshot, t / lag = 2) read
    (4 / 36) * 2**2 = 0.444 and would have frozen it while it moved."""
    timeline = Timeline()
    for epoch in (0, 2, 4, 5, 6):
        timeline.add(epoch, epoch=epoch, step=10 * epoch)
    assert timeline.lagged_by_fraction(6, 0.5) == 2 and timeline.lag_by_fraction(6, 0.5) == 3
    span = timeline.span_by_fraction(6, 0.5)
    assert span == (6, 4)
    c = 1e-4
    uneven = Movement().readiness(
        Evidence(6, ["a"], similarities={"a": 1 - 16 * c}, initial={"a": 1 - 36 * c}, measurement=4, span=span, lag=3),
        {},
    )
    assert uneven.ready == {} and uneven.notes["a"].startswith("relative movement 1.000 >= 0.75")
    assert "over the last 3 measurement(s) (4 of 6 epochs)" in uneven.notes["a"]
    counted = Movement().readiness(
        Evidence(6, ["a"], similarities={"a": 1 - 4 * c}, initial={"a": 1 - 36 * c}, measurement=4), {}
    )
    assert counted.ready["a"].startswith("relative movement 0.444 < 0.75")
    # evenly spaced, the time-based window is the counted one: lag = ceil(t / 2) measurements, span ratio t / lag
    even = Timeline()
    for epoch in range(8):
        even.add(epoch, epoch=epoch, step=epoch)
    for t in range(1, 8):
        assert even.lag_by_fraction(t, 0.5) == fraction_lag(t, 0.5) == (t + 1) // 2
        assert even.lag_by_fraction(t, 0.25) == fraction_lag(t, 0.25)
        assert even.span_by_fraction(t, 0.5) == (t, fraction_lag(t, 0.5))
    assert relative_movement(1 - 4 * c, 1 - 36 * c, 4, 0.5, (4, 2)) == relative_movement(1 - 4 * c, 1 - 36 * c, 4, 0.5)


def test_the_monitor_gives_the_rule_and_the_gate_the_epochs_it_measured_at(monkeypatch):
    """A run measured at epochs 0, 2, 4, 5, 6 (every 2 epochs, then every epoch after a resume): the rule reads the
    span (6, 4) at epoch 6, 3 measurements back, and the task's losses are placed at their epochs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    probe = torch.randn(200, 8)
    seen: list[Evidence] = []
    monitor = SVCCAMonitor(model, probe=probe, layers=["1", "3"], freeze=FreezePolicy())
    policy = monitor.config.freeze
    real = type(policy.rule).readiness
    monkeypatch.setattr(
        type(policy.rule),
        "readiness",
        lambda rule, evidence, *a, **k: seen.append(evidence) or real(rule, evidence, *a, **k),
    )
    monitor.start()
    for epoch in (2, 4, 5, 6):
        with torch.no_grad():
            model[0].weight.add_(0.05 * torch.randn_like(model[0].weight))
        monitor.measure(epoch=epoch, step=10 * epoch, loss=1.0 / (1 + epoch))
    assert [(e.span, e.lag) for e in seen] == [(None, None), ((2, 2), 1), ((4, 2), 1), ((5, 3), 2), ((6, 4), 3)]
    assert monitor.freezing.task.probe_positions() == [0, 2, 4, 5, 6]
    assert monitor.freezing.task.level_positions() == [0, 2, 4, 5, 6]
    monitor.close()
    # by steps, as the adapters measure with every_n_train_steps=20 and 24 steps an epoch (the epoch ends too)
    seen.clear()
    by_step = SVCCAMonitor(model, probe=probe, layers=["1", "3"], freeze=FreezePolicy(), every_n_train_steps=20)
    by_step.start()
    for step in (20, 24, 40, 48):
        by_step.measure(epoch=step // 24, step=step, loss=1.0 / (1 + step))
    # at step 24 the window reaches back to step 0 (half the run is 12 steps): not judged, where counting read
    # 4 steps as half the run
    assert [e.span for e in seen] == [None, (20, 20), (24, 24), (40, 20), (48, 24)]
    by_step.close()


def test_movement_waits_for_patience_and_its_window_follows_lag_fraction():
    evidence = Evidence(8, ["a"], similarities={"a": 1 - 0.01 / 64}, initial={"a": 0.99}, metric="pwcca")
    found = Movement().readiness(evidence, {}, patience=2)
    assert found.ready == {} and "1 - pwcca" in found.notes["a"] and found.streaks == {"a": 1}
    assert "over the last 2 measurement(s)" in Movement(lag_fraction=0.25).readiness(evidence, {}).ready["a"]


def test_movement_counts_idle_layers_and_skips_frozen_ones():
    evidence = Evidence(1, ["emb", "a"], frozen={"a": 1}, idle=["emb"])
    found = Movement().readiness(evidence, {"emb": 1})
    assert found.ready == {"emb": "nothing of its own trains"} and found.streaks == {"emb": 2}


def test_convergence_names_the_snapshot_by_epochs_or_measurements():
    evidence = Evidence(6, ["a", "b"], similarities={"a": 0.995, "b": 0.9})
    found = Convergence(lag=2).readiness(evidence, {})
    assert found.ready == {"a": "svcca to epoch 4 = 0.9950 >= 0.99 for 1 measurement(s)"}
    assert found.notes == {"b": "svcca to epoch 4 = 0.9000 < 0.99"}
    by_step = Evidence(6, ["a"], similarities={"a": 0.995}, lag_in_measurements=True)
    assert "to the snapshot 2 measurement(s) earlier" in Convergence(lag=2).readiness(by_step, {}).ready["a"]


def test_convergence_keeps_the_streak_of_an_unmeasured_layer_and_reads_the_baseline_when_noise_aware():
    evidence = Evidence(6, ["a", "b"], similarities={"a": 0.95}, baselines={"a": 0.8})
    assert Convergence(threshold=0.9).readiness(evidence, {"b": 4}).streaks == {"a": 1, "b": 4}
    aware = Convergence(threshold=0.9, noise_aware=True).readiness(evidence, {})
    assert aware.ready == {} and "0.7500 above the shuffled baseline 0.8000 < 0.9" in aware.notes["a"]


def test_schedules_freeze_at_their_epochs_whatever_the_measurements():
    evidence = Evidence(2, ["a", "b", "c"], frozen={"a": 1}, max_epochs=3)
    assert LinearSchedule().readiness(evidence, {"x": 1}).ready == {"b": "scheduled for epoch 2 by the linear schedule"}
    assert LinearSchedule().readiness(evidence, {"x": 1}).streaks == {"x": 1}
    found = Schedule({"_orig_mod.b": 2, "c": 3}).readiness(evidence, {})
    assert found.ready == {"b": "scheduled for epoch 2"} and found.notes == {}


def test_what_each_rule_tells_the_monitor():
    assert Movement(lag_fraction=0.25).lagged == LaggedSnapshot(fraction=0.25, initial=True)
    assert Convergence(lag=3).lagged == LaggedSnapshot(lag=3)
    assert LinearSchedule().lagged is None and Schedule({"a": 1}).lagged is None
    assert Movement(lag_fraction=0.25).loss_window == 0.25 and Convergence().loss_window == 0.5
    assert Convergence(noise_aware=True).needs_baseline and not Movement().needs_baseline
    assert Movement.reads_task and Convergence.reads_task and not LinearSchedule.reads_task
    assert not Schedule.reads_task
    with pytest.raises(ValueError, match="set Trainer\\(max_epochs"):
        LinearSchedule().check_fit(None)
    with pytest.raises(ValueError, match=r"not monitored: \['x'\]"):
        Schedule({"x": 1}).check_layers(["a"])
    assert "judges a layer from its second measurement" in (Movement().short_fit_warning(3, 1) or "")
    assert Movement().short_fit_warning(8, 1) is None and Convergence().short_fit_warning(3, 1) is None


def test_the_policy_applies_the_task_gate_only_to_rules_that_read_it():
    waiting, flat = TaskVerdict(False, False, "no task progress yet"), TaskVerdict(True, True, "plateaued")
    schedule = FreezePolicy(Schedule({"a": 1}), keep_last=0)
    assert [d.layer for d in schedule.decide(Evidence(1, ["a"], task=waiting)).decisions] == ["a"]
    movement = FreezePolicy(keep_last=1)
    evidence = Evidence(8, ["a", "b", "c"], similarities={"a": 1 - 0.01 / 64}, initial={"a": 0.99}, task=waiting)
    blocked = movement.decide(evidence, {"a": 5})
    assert blocked.decisions == [] and blocked.streaks == {"a": 6, "b": 0, "c": 0}  # counted, not frozen
    plateau = movement.decide(Evidence(8, ["a", "b", "c"], task=flat))
    assert [(d.layer, d.reason) for d in plateau.decisions] == [("a", "plateaued"), ("b", "plateaued")]


def test_no_module_of_the_package_tests_a_mode_string():
    found = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.mode\s*(==|!=|in\b|not in\b)|mode\s*==\s*[\"']", line)
    ]
    assert found == [], "ask the rule object (policy.rule) instead of testing a mode string"


def test_keep_last_keeps_the_top_layers_that_train_not_a_head_with_nothing_trainable():
    """A LoRA model's head has no trainable parameters: keeping it back would protect nothing, so the kept layer is
    the top one that trains, and the head above it never freezes either."""
    plateau = TaskVerdict(True, True, "plateaued")
    layers = ["emb", "h0", "h1", "head"]
    policy = FreezePolicy(Schedule({"emb": 1, "h0": 1, "h1": 1, "head": 1}), keep_last=1)
    assert policy.kept_from(layers, idle=["emb", "head"]) == 2 and policy.kept_from(layers) == 3
    decided = policy.decide(Evidence(1, layers, idle=["emb", "head"], task=plateau))
    assert [d.layer for d in decided.decisions] == ["emb", "h0"]
    assert [d.layer for d in policy.decide(Evidence(1, layers, task=plateau)).decisions] == ["emb", "h0", "h1"]
    assert FreezePolicy(Schedule({"h0": 1}), keep_last=5).kept_from(layers, idle=["head"]) == 0
    assert FreezePolicy(Schedule({"h0": 1}), keep_last=0).kept_from(layers, idle=["head"]) == 4
