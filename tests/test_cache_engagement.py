"""The prefix cache says what it does and never costs: log lines and scalars when it engages, serves or turns off;
index keys; inputs that never repeat closed within the epoch after the fill; a served step that is not faster
turns it off (the measured bypass)."""

from __future__ import annotations

import logging
import time
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from test_prefix_cache import _fit, _schedule
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback
from lightning_svcca.freezing import IndexedDataset
from lightning_svcca.freezing.cache_keys import index_keys, take_indices
from lightning_svcca.freezing.cache_store import SampleStore
from lightning_svcca.freezing.cache_usage import BASELINE_EVERY, TIMED_STEPS, CacheUsage, Step
from lightning_svcca.freezing.freezer import Freezer
from lightning_svcca.freezing.prefix_cache import PrefixCacheWarning

from digits_models import DigitsCNN, digits_tensors
from helpers import console_lines, quiet_trainer

LAYERS = ["relu1", "relu2", "relu3", "fc2"]


class _Metrics(Logger):
    """A Lightning logger that keeps every scalar it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _fit_logged(tmp_path, policy, *, data=None, epochs=5, batch_size=64):
    """A fit with a metrics logger and the callback's console lines captured."""
    (x_train, y_train), (x_probe, _), _ = digits_tensors()
    data = data if data is not None else TensorDataset(x_train[:320], y_train[:320])
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    callback = SVCCACallback(probe=x_probe[:128], layers=LAYERS, reference=["previous"], freeze=policy)
    lines, metrics = _Lines(), _Metrics()
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=epochs, logger=metrics)
    with console_lines(callback, lines):
        pl.seed_everything(0, verbose=False)
        model = DigitsCNN()
        trainer.fit(model, loader)
    return model, callback, lines.lines, metrics.metrics


def test_a_real_fit_logs_when_the_cache_engages_and_serves_with_its_scalars(tmp_path):
    _, _, lines, metrics = _fit_logged(tmp_path, _schedule(True))
    engaged = [line for line in lines if line.startswith("frozen-prefix cache engaged up to 'relu2'")]
    assert len(engaged) == 1 and "keyed by input bytes" in engaged[0]
    froze = next(index for index, line in enumerate(lines) if line.startswith("froze layer 'relu2'"))
    assert froze < lines.index(engaged[0])  # the freeze is said first, then what the cache does about it
    assert any(line.startswith("frozen-prefix cache up to 'relu2' serves") for line in lines), lines
    cache = {step: m for step, m in metrics if "svcca/cache/served_share" in m}
    per_sample = 16 * 8 * 8 * 4  # relu2's output: 16 channels of 8x8 float32
    # measured after each epoch from the first freeze on (steps 5, 10, ...): the relu2 cache fills in the third
    # epoch; in the fourth, 2 of 5 batches are verified in full and 1 times the full step: 2 of 5 served
    assert sorted(cache) == [10, 15, 20, 25]
    assert cache[15]["svcca/cache/served_share"] == 0.0 and cache[15]["svcca/cache/bytes"] == 320 * per_sample
    assert cache[20]["svcca/cache/served_share"] == pytest.approx(2 / 5)
    assert cache[25]["svcca/cache/served_share"] == pytest.approx(4 / 5)


class _RandomFlip(Dataset):
    """Digits flipped left-right with probability 0.5 at every access: half the inputs repeat, no batch does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        x = self.x[index]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), self.y[index]


def test_random_flips_close_the_cache_with_a_warning_in_the_epoch_after_the_fill(tmp_path):
    (x, y), _, _ = digits_tensors()
    policy = FreezePolicy(mode="schedule", schedule={"relu1": 1}, cache_outputs=True)
    with pytest.warns(PrefixCacheWarning, match="do not repeat exactly") as caught:
        _, callback, lines, metrics = _fit_logged(tmp_path, policy, data=_RandomFlip(x[:320], y[:320]), epochs=4)
    # relu1 froze after epoch 1, the cache filled in epoch 2 and was closed in epoch 3 (after 256 lookups)
    message = next(str(w.message) for w in caught if "do not repeat" in str(w.message))
    assert "of the first 256 samples" in message
    assert any("turned off: training inputs do not repeat exactly" in line for line in lines)
    cache = {
        step: (m["svcca/cache/served_share"], m["svcca/cache/bytes"]) for step, m in metrics if "svcca/cache/bytes" in m
    }
    assert cache[10][1] > 0 and cache[15] == (0.0, 0.0)  # filled after epoch 2, off after epoch 3
    assert callback.monitor.freezing.freezer.cache is None or not callback.monitor.freezing.freezer.cache.enabled


def test_index_keys_train_bit_identically_to_byte_keys(tmp_path):
    (x, y), _, _ = digits_tensors()
    runs = {}
    for key in ("bytes", "index"):
        data = TensorDataset(x[:320], y[:320])
        pl.seed_everything(0, verbose=False)
        model = DigitsCNN()
        _, spy = _fit(
            tmp_path / key,
            model,
            _schedule(True, cache_key=key),
            data=IndexedDataset(data) if key == "index" else data,
        )
        runs[key] = model.state_dict(), spy.counters
    (bytes_weights, bytes_counters), (index_weights, index_counters) = runs["bytes"], runs["index"]
    for name, value in bytes_weights.items():
        assert torch.equal(index_weights[name], value), name
    assert index_counters == bytes_counters and index_counters["skipped"] == 6


def test_index_keys_without_indexed_batches_turn_the_cache_off(tmp_path):
    pl.seed_everything(0, verbose=False)
    with pytest.warns(PrefixCacheWarning, match="carries no dataset index"):
        _, spy = _fit(tmp_path, DigitsCNN(), _schedule(True, cache_key="index"))
    assert spy.counters is None or not spy.counters["enabled"]


def test_indexed_dataset_batches_lose_their_indices_before_the_step():
    data = IndexedDataset(TensorDataset(torch.arange(6.0), torch.arange(6)))
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert take_indices(batch) == ["0", "1", "2"] and len(batch) == 2 and torch.equal(batch[0], torch.arange(3.0))
    assert take_indices(batch) is None  # a batch without indices is left alone
    assert take_indices({"x": torch.zeros(2)}) is None
    assert take_indices({"x": torch.zeros(2), "svcca_index": ["4", "7"]}) == ["4", "7"]
    with pytest.raises(TypeError, match="tuples, lists or dicts"):
        IndexedDataset(torch.arange(3.0))[0]
    # the call's layout is part of an index key: another row shape, another key
    x = torch.zeros(2, 3)
    assert index_keys(["4", "7"], (x,), {}) != index_keys(["4", "7"], (torch.zeros(2, 4),), {})
    assert index_keys(["4"], (x,), {}) is None  # indices that do not match the batch: no keys


def test_a_served_step_made_slower_turns_the_cache_off(tmp_path, monkeypatch):
    """The bypass: with serving made slow (a sleep in the lookup), the timing finds it slower and turns it off."""
    gather = SampleStore.gather

    def slow_gather(self, keys, device):
        time.sleep(0.05)
        return gather(self, keys, device)

    monkeypatch.setattr(SampleStore, "gather", slow_gather)
    policy = FreezePolicy(mode="schedule", schedule={"relu1": 1}, cache_outputs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrefixCacheWarning)  # turned off by the timing: a log line, no warning
        _, callback, lines, _ = _fit_logged(tmp_path, policy, epochs=6, batch_size=32)
    off = [line for line in lines if "turned off: a served step is not 2% faster than a full one" in line]
    assert len(off) == 1, lines
    assert callback.monitor.freezing.freezer.cache is None or not callback.monitor.freezing.freezer.cache.enabled


def test_a_longer_prefix_gets_a_new_cache_after_a_short_one_was_not_faster(tmp_path, monkeypatch):
    """Not faster is a verdict on one prefix: when the next layer freezes, the longer prefix is cached and timed."""
    gather, slow = SampleStore.gather, {"on": True}

    def gather_slowly_at_first(self, keys, device):
        if slow["on"]:
            time.sleep(0.05)
        return gather(self, keys, device)

    monkeypatch.setattr(SampleStore, "gather", gather_slowly_at_first)
    build = Freezer._build_cache

    def build_then_serve_fast(self, model, modules, boundary, below):
        slow["on"] = boundary == "relu1"  # serving the one-stage prefix is slow, the two-stage one is not
        return build(self, model, modules, boundary, below)

    monkeypatch.setattr(Freezer, "_build_cache", build_then_serve_fast)
    policy = FreezePolicy(mode="schedule", schedule={"relu1": 1, "relu2": 4}, cache_outputs=True)
    _, _, lines, _ = _fit_logged(tmp_path, policy, epochs=7, batch_size=32)
    engaged = [line for line in lines if "frozen-prefix cache engaged up to" in line]
    off = [line for line in lines if "turned off: a served step is not 2% faster" in line]
    assert [("'relu1'" in line, "'relu2'" in line) for line in engaged] == [(True, False), (False, True)], lines
    assert len(off) == 1 and "'relu1'" in off[0] and "a longer frozen prefix gets a new cache" in off[0]
    assert any("cache up to 'relu2' serves" in line for line in lines), lines


def test_usage_judges_speed_from_whole_step_times():
    usage = CacheUsage()
    usage.start_batch(0)
    assert [usage.runs_baseline() for _ in range(2 * BASELINE_EVERY)].count(True) == 2
    usage.timings[Step.FULL] = [1.0] * TIMED_STEPS
    usage.timings[Step.SERVED] = [0.99] * (2 * TIMED_STEPS)  # 1% faster: not enough to pay for the cache
    verdict = usage.start_batch(0)
    assert verdict is not None and verdict.off and not verdict.warn and usage.faster is False
    usage = CacheUsage()
    usage.timings[Step.FULL] = [1.0] * TIMED_STEPS
    usage.timings[Step.SERVED] = [0.5] * (2 * TIMED_STEPS)
    verdict = usage.start_batch(0)
    assert verdict is not None and not verdict.off and usage.faster and not usage.runs_baseline()


def test_policy_checks_the_cache_options():
    assert FreezePolicy(cache_outputs=True, cache_key="index", cache_device="cpu").cache.device == "cpu"
    with pytest.raises(ValueError, match="key must be one of"):
        FreezePolicy(cache_outputs=True, cache_key="hash")
    with pytest.raises(ValueError, match="device must be one of"):
        FreezePolicy(cache_outputs=True, cache_device="gpu")


def test_store_keeps_rows_on_the_device_tier_first_then_host_then_files(tmp_path):
    rows = torch.arange(12.0).reshape(4, 3)
    size = 3 * 4
    store = SampleStore(3 * size, lambda: tmp_path / "spill", torch.device("meta"), device_bytes=size)
    store.device = torch.device("cpu")  # a stand-in device tier that the CPU can hold
    store.store([b"a", b"b", b"c", b"d"], rows)
    assert store.on_device_bytes == size and store.memory_bytes == 3 * size and len(store.files) == 1
    assert store.total_bytes == 4 * size
    assert torch.equal(store.gather([b"d", b"a"], torch.device("cpu")), rows[[3, 0]])
    store.close()
    assert store.total_bytes == 0 and not (tmp_path / "spill").exists()
