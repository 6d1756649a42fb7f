"""The freeze rule's task gate: the training loss must have progressed before anything freezes.

The reproduction of the issue: a BERT from its config on a keyword task sits at chance (loss 0.69) for its first
~45 steps, then learns it (measured every 8 steps). Its layers barely move on that plateau, so the representation
rule alone freezes them there, and the run never learns the task; with the gate nothing freezes before the loss
leaves the plateau.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from lightning_svcca import FreezePolicy
from lightning_svcca.freezing.task_signal import TaskGate, TaskSignal

transformers = pytest.importorskip("transformers")


def _benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (registered: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: The label-prior benchmark: its imbalanced task and fit, and the dataset both HF Trainer tests here use.
BENCH = _benchmark("freeze_label_prior")

VOCAB, LENGTH, KEYWORD = 64, 32, 4


def _signal(start: float, levels: list[float]) -> TaskSignal:
    signal = TaskSignal()
    for _ in range(4):
        signal.observe(start)
    signal.close_interval()
    signal.levels = list(levels)
    return signal


def _pace(reason: str) -> float:
    return float(re.search(r"recent pace (-?[\d.]+)", reason).group(1))


def test_no_freeze_allowed_before_the_loss_falls_by_min_progress():
    gate = TaskGate(min_progress=0.1)
    assert not gate.verdict(_signal(0.693, [0.69, 0.694, 0.64]), 0.5).allows  # 7.6% below the start
    verdict = gate.verdict(_signal(0.693, [0.69, 0.694, 0.62]), 0.5)  # 10.5%
    assert verdict.allows and "below its start" in verdict.reason


def test_pace_is_one_for_a_steady_fall_in_log_space_and_negative_when_the_loss_rises():
    # L(t) = L0 * q**t falls by the same factor every interval: a steady pace in log space reads exactly 1
    start, q = 2.0, 0.8
    levels = [start * q**t for t in range(1, 9)]
    reason = TaskGate(flat_below=0.3).verdict(_signal(start, levels), 0.5).reason
    assert _pace(reason) == pytest.approx(1.0, abs=0.01)
    # a loss that stops falling and creeps up again (overfitting): flat, the task has plateaued
    risen = TaskGate(flat_below=0.3, patience=1).verdict(_signal(start, [1.0, 0.5, 0.4, 0.41, 0.42, 0.43]), 0.5)
    assert risen.allows and risen.flat and _pace(risen.reason) < 0
    # one that jumps well above its best (an unstable phase at a high learning rate): not a plateau
    jumped = TaskGate(flat_below=0.3).verdict(_signal(start, [1.0, 0.5, 0.4, 0.42, 0.45, 0.5]), 0.5)
    assert jumped.allows and not jumped.flat and "25% above its best" in jumped.reason


def test_pace_matches_its_formula_on_a_recorded_curve():
    levels = [1.058, 0.650, 0.502, 0.399, 0.312]  # benchmark (c), seed 0, epoch means
    start, t, lag = 1.386, 5, 3  # lag = floor(0.5 * 5 + 1/2)
    expected = (math.log(levels[t - 1 - lag]) - math.log(levels[-1])) / (math.log(start) - math.log(levels[-1]))
    reason = TaskGate().verdict(_signal(start, levels), 0.5).reason
    assert _pace(reason) == pytest.approx(expected * t / lag, abs=0.01)


def test_a_loss_that_can_be_negative_is_read_on_its_own_scale():
    verdict = TaskGate(min_progress=0.1).verdict(_signal(-1.0, [-1.5, -2.0, -2.1, -2.12, -2.13]), 0.5)
    assert verdict.allows and verdict.flat


def test_a_plateau_needs_patience_readings_in_a_row_over_a_window_of_min_window():
    start, levels = 2.0, [1.0, 0.5, 0.45, 0.44, 0.43]  # pace 0.80 at t = 3, then 0.17 and 0.16
    flat_at = [TaskGate().verdict(_signal(start, levels[:t]), 0.5).flat for t in range(1, 6)]
    assert flat_at == [False, False, False, False, True]  # t = 4 is the first flat reading, t = 5 the second
    assert TaskGate(patience=1).verdict(_signal(start, levels[:4]), 0.5).flat
    assert not TaskGate(patience=1).verdict(_signal(start, levels[:3]), 0.5).flat
    # lag 1 at t = 2: one interval decides, below min_window
    assert not TaskGate(patience=1).verdict(_signal(start, [1.0, 0.99]), 0.5).flat
    assert TaskGate(patience=1, min_window=1).verdict(_signal(start, [1.0, 0.99]), 0.5).flat


def test_unevenly_spaced_measurements_read_a_steady_fall_as_pace_one():
    """Measured at epochs 0, 2, 4, 5, 6 (a resume that went from every 2 epochs to every epoch): a loss falling by the
    same factor per epoch reads pace 1 over the epochs its values were taken at; counting measurements read 0.67."""
    start, q, points = 2.0, 0.8, [0, 2, 4, 5, 6]
    losses = [start * q**point for point in points]
    state = {
        "start": start, "levels": losses[1:], "level_points": points[1:], "start_point": 0,
        "probe": losses, "probe_points": points,
    }  # fmt: skip
    signal = TaskSignal()
    signal.load_state_dict(state)
    paces = re.findall(r"recent pace (-?[\d.]+)", TaskGate().verdict(signal, 0.5).reason)
    assert [float(pace) for pace in paces] == pytest.approx([1.0, 1.0], abs=0.01)  # probe loss, training loss
    evenly = TaskSignal()
    evenly.load_state_dict({**state, "probe_points": [], "level_points": []})  # a checkpoint from before points
    assert _pace(TaskGate().verdict(evenly, 0.5).reason) == pytest.approx(4 / 6, abs=0.01)  # (4 epochs / 2) / 3


def test_each_value_is_placed_at_its_measurement_and_the_first_interval_where_training_began():
    signal = TaskSignal()
    signal.close_interval(None, 0)  # measured before training: no loss yet
    for point, loss in ((3, 0.8), (5, 0.7), (6, 0.6)):
        signal.observe(loss)
        signal.close_interval(loss, point)
    assert (signal.probe_positions(), signal.level_positions()) == ([0, 3, 5, 6], [0, 3, 5, 6])
    again = TaskSignal()
    again.load_state_dict(signal.state_dict())
    assert (again.probe_positions(), again.level_positions()) == ([0, 3, 5, 6], [0, 3, 5, 6])
    again.forget_probe()  # another probe after a resume: its curve is not read, nor placed
    assert again.probe_positions() is None and again.level_positions() == [0, 3, 5, 6]


def test_the_signal_survives_a_checkpoint_and_rejects_malformed_state():
    signal = _signal(1.0, [0.9, 0.8])
    restored = TaskSignal()
    restored.load_state_dict(signal.state_dict())
    assert (restored.start, restored.levels) == (1.0, [0.9, 0.8])
    with pytest.raises(ValueError, match="task.levels"):
        TaskSignal().load_state_dict({"levels": ["a"]})
    with pytest.raises(ValueError, match="task.start"):
        TaskSignal().load_state_dict({"start": float("inf")})
    with pytest.raises(ValueError, match="task.level_points"):
        TaskSignal().load_state_dict({"level_points": [1.5]})


def test_tensors_are_read_once_per_measurement_and_non_finite_losses_are_left_out():
    signal = TaskSignal()
    for value in (2.0, 2.0, 2.0, 2.0, 1.0, float("nan"), 1.0):
        signal.observe(torch.tensor(value))
    assert signal.close_interval() == pytest.approx(10.0 / 6)
    assert signal.start == 2.0
    assert signal.close_interval() is None  # nothing since


def test_the_label_prior_is_the_entropy_of_the_probe_labels_and_progress_is_read_from_it():
    from scipy.stats import entropy

    from lightning_svcca.pipeline.probe import build_probe
    from lightning_svcca.pipeline.probe_loss import label_entropy

    labels = torch.tensor([0] * 83 + [1] * 17)
    probe = build_probe({"input_ids": torch.zeros(100, 4, dtype=torch.long), "labels": labels}, 100)
    assert label_entropy(probe) == pytest.approx(entropy([83, 17]))  # scipy normalises the counts
    tokens = torch.tensor([[5, 5, 7, -100], [7, 9, -100, -100]])  # language-model labels: -100 ignored
    batch = build_probe({"input_ids": tokens.clamp_min(0), "labels": tokens}, 2)
    assert label_entropy(batch) == pytest.approx(entropy([2, 2, 1]))
    assert label_entropy(build_probe(torch.randn(8, 3), 8)) is None  # no labels
    assert label_entropy(build_probe((torch.randn(8, 3), torch.rand(8)), 8)) is None  # float targets: regression
    # a loss that fell from its start (0.68) to the class frequencies' entropy (0.46) has made no progress
    signal = TaskSignal()
    signal.load_state_dict({"probe": [0.68, 0.47, 0.45, 0.44], "start": 0.65, "levels": [0.5, 0.45, 0.44]})
    signal.prior = float(entropy([83, 17]))
    verdict = TaskGate().verdict(signal, 0.5)
    assert (
        not verdict.allows and "probe loss 0.44 (3% below the labels' entropy 0.4559, its start 0.68" in verdict.reason
    )
    assert TaskGate(label_prior=False).verdict(signal, 0.5).allows  # 35% below its start


def test_bad_gate_settings_name_the_setting():
    with pytest.raises(ValueError, match="min_progress"):
        TaskGate(min_progress=1.5)
    with pytest.raises(ValueError, match="flat_below"):
        TaskGate(flat_below=-1.0)


# --------------------------------------------------------------------------------------------------------------
# The case: a loss plateau before learning, under the HuggingFace Trainer
# --------------------------------------------------------------------------------------------------------------


def _keyword_task(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences; label 1 iff the keyword token appears (at a random position)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(KEYWORD + 1, VOCAB, (count, LENGTH), generator=generator)
    y = torch.randint(0, 2, (count,), generator=generator)
    position = torch.randint(1, LENGTH, (count,), generator=generator)
    x[y == 1, position[y == 1]] = KEYWORD
    x[:, 0] = 2  # [CLS]
    return x, y


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=LENGTH, num_labels=2,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _fit_keyword_bert(tmp_path, policy: FreezePolicy | None) -> tuple[float, dict[str, int], list[tuple[int, float]]]:
    """Fit 3 epochs (192 steps) with the callback (``policy=None``: without it); accuracy, freeze steps, losses."""
    from lightning_svcca.huggingface import SVCCATrainerCallback

    x, y = _keyword_task(2048 + 512, seed=0)
    model = _bert()
    losses: list[tuple[int, float]] = []

    class Losses(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))

    callbacks: list = [Losses()]
    monitor = None
    if policy is not None:
        probe = {"input_ids": x[2048:2304]}
        monitor = SVCCATrainerCallback(probe=probe, every_n_train_steps=8, freeze=policy, writers=None)
        callbacks.append(monitor)
    args = transformers.TrainingArguments(
        str(tmp_path), num_train_epochs=3, per_device_train_batch_size=32, learning_rate=1e-3,
        lr_scheduler_type="cosine", logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0,
    )  # fmt: skip
    transformers.Trainer(
        model=model, args=args, train_dataset=BENCH.LabelledSequences(x[:2048], y[:2048]), callbacks=callbacks
    ).train()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(input_ids=x[2048:]).logits.argmax(1) == y[2048:]).float().mean())
    frozen_at = {}  # layer -> the global step of its freeze
    for row in monitor.history if monitor else []:
        if row["reference"] == "frozen" and row["value"] == 1.0:
            frozen_at.setdefault(row["layer"], row["step"])
    return accuracy, frozen_at, losses


@pytest.mark.slow
def test_a_loss_plateau_before_learning_freezes_nothing_until_the_loss_leaves_it(tmp_path, caplog):
    baseline, _, curve = _fit_keyword_bert(tmp_path / "baseline", None)
    left_plateau = next(step for step, loss in curve if loss < 0.9 * 0.693)  # first log 10% below chance
    assert left_plateau >= 30, "the task must sit on its plateau for a while for this test to mean anything"

    # the representations alone freeze the layers on the plateau, and the run never learns the task
    ungated, frozen_ungated, _ = _fit_keyword_bert(tmp_path / "ungated", FreezePolicy(task=None))
    assert frozen_ungated and min(frozen_ungated.values()) < left_plateau  # frozen on the plateau
    assert ungated < baseline - 0.2

    with caplog.at_level(logging.INFO, logger="lightning_svcca"):
        gated, frozen, _ = _fit_keyword_bert(tmp_path / "gated", FreezePolicy())
    assert min(frozen.values(), default=math.inf) >= left_plateau
    assert abs(gated - baseline) <= 0.003, (gated, baseline, frozen)
    waits = [record.getMessage() for record in caplog.records if "freezing waits" in record.getMessage()]
    assert any("no task progress yet" in line for line in waits), waits


@pytest.mark.slow
def test_a_loss_at_the_class_frequencies_entropy_is_no_progress(tmp_path, caplog):
    """``benchmarks/freeze_label_prior.py``, seed 0: the loss falls from its start to the entropy of the class
    frequencies at once and stays there for a hundred steps. Read from its start, that was 36% progress and a
    plateau, and every layer froze on it; read from the labels' entropy, nothing freezes before the task is learnt."""
    baseline = BENCH.fit(tmp_path / "baseline", None, callback=False)
    learnt = BENCH.learnt_at(baseline.curve, BENCH.label_prior())
    assert learnt is not None and learnt >= 100, "the task must sit at the class frequencies for a while"

    from_start = BENCH.fit(tmp_path / "from-start", FreezePolicy(task=TaskGate(label_prior=False)))
    assert from_start.frozen_at and max(from_start.frozen_at.values()) < learnt  # frozen before the task was learnt
    assert from_start.accuracy < baseline.accuracy - 0.05

    with caplog.at_level(logging.INFO, logger="lightning_svcca"):
        gated = BENCH.fit(tmp_path / "gated", FreezePolicy())
    assert min(gated.frozen_at.values(), default=math.inf) >= learnt
    assert abs(gated.accuracy - baseline.accuracy) <= 0.003, (gated, baseline)
    waits = [record.getMessage() for record in caplog.records if "freezing waits" in record.getMessage()]
    assert any("no task progress yet" in line and "the labels' entropy" in line for line in waits), waits


def test_lightning_reports_the_training_loss_and_a_labelled_probe_gives_its_own(digits, digits_cnn, make_trainer):
    from lightning_svcca import SVCCACallback

    x, y = digits
    labelled = SVCCACallback(probe=(x[1500:1628], y[1500:1628]), layers=["relu1", "relu2"], freeze=FreezePolicy())
    make_trainer([labelled], max_epochs=3).fit(
        digits_cnn(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:256], y[:256]), batch_size=64)
    )
    task = labelled.monitor.freezing.task
    assert len(task.levels) == 3 and task.start is not None  # one mean per epoch, from training_step's loss
    assert len(task.probe) == 4 and all(value is not None for value in task.probe)  # before training, each epoch
    expected = float(nn.functional.cross_entropy(labelled.monitor.model.eval()(x[1500:1628]), y[1500:1628]))
    assert task.probe[-1] == pytest.approx(expected, rel=1e-4)  # cross-entropy of the logits against the labels
    state = labelled.state_dict()["task"]
    assert state["levels"] == task.levels and state["probe"] == task.probe

    unlabelled = SVCCACallback(probe=x[1500:1628], layers=["relu1", "relu2"], freeze=FreezePolicy())
    make_trainer([unlabelled], max_epochs=2).fit(
        digits_cnn(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:256], y[:256]), batch_size=64)
    )
    assert unlabelled.monitor.freezing.task.probe == [None, None, None]


def test_a_probe_changed_on_resume_is_not_read_again_and_the_training_loss_gates():
    signal = _signal(2.0, [1.0, 0.8])
    signal.probe = [1.5, 0.9, 0.7]
    signal.forget_probe()
    for value in (0.69, 0.68, 0.68):  # the new probe's losses, late in the run: no progress from their own start
        signal.levels.append(0.5)
        signal.close_interval(value)
    verdict = TaskGate().verdict(signal, 0.5)
    assert verdict.allows and "probe loss" not in verdict.reason  # the training loss alone, 75% below its start
    restored = TaskSignal()
    restored.load_state_dict(signal.state_dict())
    assert restored.probe[0] is None  # still unread after the next checkpoint
