"""The frozen-prefix output cache: same training as without it, frozen layers fixed, refused or turned off where
it would change training, spilled beyond its budget, rebuilt after a resume."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback
from lightning_svcca.freezing.cache_keys import sample_keys
from lightning_svcca.freezing.prefix_cache import PrefixCacheWarning

from digits_models import DigitsCNN, TinyDigitsCNN, digits_tensors
from helpers import quiet_trainer

LAYERS = ["relu1", "relu2", "relu3", "fc2"]
FROZEN = ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var")


class _Spy(pl.Callback):
    """Records the cache's counters at the end of training, the state after the freeze, and every gradient."""

    def __init__(self, callback: SVCCACallback, freeze_epoch: int = 1) -> None:
        self.callback = callback
        self.freeze_epoch = freeze_epoch
        self.counters: dict[str, int] | None = None
        self.spill_dir = None
        self.after_freeze: dict[str, torch.Tensor] | None = None
        self.gradients_seen: set[str] = set()
        #: Training forward passes that computed conv1 and conv2 (a short cut returns its input), per epoch.
        self.ran: dict[int, dict[str, int]] = {}
        #: Entries left in the cache below the current one at the end of each epoch.
        self.below_entries: dict[int, int] = {}
        self._epoch = 0

    def on_train_start(self, trainer, pl_module):
        def counter(name):
            def hook(module, args, output):
                if pl_module.training and output is not args[0]:
                    counts = self.ran.setdefault(self._epoch, {"conv1": 0, "conv2": 0})
                    counts[name] += 1

            return hook

        for name in ("conv1", "conv2"):
            if hasattr(pl_module, name):
                getattr(pl_module, name).register_forward_hook(counter(name))

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch = trainer.current_epoch
        if trainer.current_epoch == self.freeze_epoch:
            self.after_freeze = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_end(self, trainer, pl_module):
        cache = self.callback.monitor.freezing.freezer.cache
        if cache is not None and cache.below is not None:
            self.below_entries[trainer.current_epoch] = len(cache.below)

    def on_after_backward(self, trainer, pl_module):
        if trainer.current_epoch >= self.freeze_epoch:
            self.gradients_seen |= {name for name, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, pl_module):
        cache = self.callback.monitor.freezing.freezer.cache
        if cache is not None:
            self.counters = {
                "enabled": cache.enabled,
                "skipped": cache.skipped_batches,
                "extended": cache.extended_batches,
                "below": cache.below is not None,
                "verified": cache.verified,
                "entries": len(cache),
                "memory": cache.memory_bytes,
                "files": len(cache.store.files),
            }
            self.spill_dir = cache.store.spill_dir


def _fit(tmp_path, model, policy, *, data=None, epochs=5, callbacks=(), layers=LAYERS, ckpt_path=None):
    (x_train, y_train), (x_probe, _), _ = digits_tensors()
    data = data if data is not None else TensorDataset(x_train[:320], y_train[:320])
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    callback = SVCCACallback(probe=x_probe[:128], layers=layers, reference=["previous"], freeze=policy)
    spy = _Spy(callback)
    trainer = quiet_trainer(
        tmp_path, [callback, spy, *callbacks], max_epochs=epochs, enable_checkpointing=bool(callbacks)
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return callback, spy


def _schedule(cache: bool, **kwargs) -> FreezePolicy:
    return FreezePolicy(mode="schedule", schedule={"relu1": 1, "relu2": 2}, cache_outputs=cache, **kwargs)


@pytest.mark.parametrize("model_class", [DigitsCNN, TinyDigitsCNN])
def test_cache_trains_the_same_and_skips_the_prefix(tmp_path, model_class):
    """Same data order, same updates: with dropout above the prefix (TinyDigitsCNN) too."""
    models, spies = [], []
    for cache in (False, True):
        pl.seed_everything(0, verbose=False)
        model = model_class()
        _, spy = _fit(tmp_path / str(cache), model, _schedule(cache))
        models.append(model)
        spies.append(spy)
    without, with_cache = (model.state_dict() for model in models)
    for name, value in without.items():
        torch.testing.assert_close(with_cache[name], value, rtol=1e-5, atol=1e-6, msg=name)
    counters = spies[1].counters
    # epoch 3 fills the cache at the relu2 boundary; epochs 4 and 5 hit: 2 verified, 2 run in full to time the
    # cache against (one in BASELINE_EVERY once it serves), the other 6 batches skipped
    assert counters["enabled"] and counters["verified"] == 2 and counters["skipped"] == 6
    assert counters["entries"] == 320
    # epoch 2 filled the relu1 cache, so epoch 3 fills the relu2 one from it: conv1 does not run, conv2 does
    # (the spy counts by 0-based current_epoch)
    # the relu1 cache (320 entries when relu2 froze) handed its outputs up as they were used, and was closed once
    # an epoch (the fourth) was served from the relu2 cache alone
    assert counters["extended"] == 5 and spies[1].below_entries == {1: 320, 2: 0, 3: 0} and not counters["below"]
    ran = spies[1].ran
    assert ran[1] == {"conv1": 5, "conv2": 5} and ran[2] == {"conv1": 0, "conv2": 5}
    # 2 verified in full, then only the timing's baseline batches (the 3rd and the 6th after them) are computed
    assert ran[3] == {"conv1": 3, "conv2": 3} and ran[4] == {"conv1": 1, "conv2": 1}
    # frozen weights bit-identical, BatchNorm statistics fixed, no gradient for a frozen parameter
    final = models[1].state_dict()
    for name in FROZEN:
        assert torch.equal(final[name], spies[1].after_freeze[name]), name
    assert spies[1].gradients_seen.isdisjoint({"conv1.weight", "conv1.bias"})
    assert "fc2.weight" in spies[1].gradients_seen


class _DropoutInPrefix(DigitsCNN):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        x = self.relu1(self.drop(self.bn1(self.conv1(x))))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


class _SkipConnection(DigitsCNN):
    """conv1's output (inside the relu1 prefix) reaches relu2's output: the prefix is not a prefix."""

    def forward(self, x):
        stem = self.conv1(x)
        x = self.relu1(self.bn1(stem)) + stem
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


class _ViewBeforeBoundary(DigitsCNN):
    """A shape-specific functional op between prefix modules: the short cut cannot run it."""

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.relu1(x.reshape(len(x), 8, 64).reshape(len(x), 8, 8, 8))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


@pytest.mark.parametrize(
    ("model_class", "match"),
    [
        (_DropoutInPrefix, "differs from the recomputed one"),
        (_SkipConnection, "output changes when the prefix is skipped"),
        (_ViewBeforeBoundary, "forward pass fails when the prefix is skipped"),
    ],
)
def test_cache_refused_or_turned_off_where_it_would_change_training(tmp_path, model_class, match):
    results = []
    for cache in (False, True):
        pl.seed_everything(0, verbose=False)
        model = model_class()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, spy = _fit(
                tmp_path / str(cache),
                model,
                FreezePolicy(mode="schedule", schedule={"relu1": 1}, cache_outputs=cache),
                epochs=4,
            )
        results.append(model.state_dict())
    messages = [str(w.message) for w in caught if issubclass(w.category, PrefixCacheWarning)]
    assert any(match in message for message in messages), messages
    assert spy.counters is None or not spy.counters["enabled"]
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


class _Augmented(Dataset):
    """Digits with fresh noise at every access: no input ever repeats."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index] + 0.01 * torch.randn_like(self.x[index]), self.y[index]


def test_random_augmentation_turns_the_cache_off_and_never_serves_a_stale_output(tmp_path):
    (x, y), _, _ = digits_tensors()
    pl.seed_everything(0, verbose=False)
    with pytest.warns(PrefixCacheWarning, match="do not repeat exactly"):
        _, spy = _fit(
            tmp_path,
            DigitsCNN(),
            FreezePolicy(mode="schedule", schedule={"relu1": 1}, cache_outputs=True),
            data=_Augmented(x[:192], y[:192]),
            epochs=4,
        )
    assert spy.counters is not None and not spy.counters["enabled"] and spy.counters["skipped"] == 0


def test_outputs_beyond_the_budget_spill_to_files_that_are_deleted(tmp_path):
    per_sample = 16 * 8 * 8 * 4  # relu2's output: 16 channels of 8x8 float32
    policy = _schedule(True, cache_max_bytes=100 * per_sample)
    pl.seed_everything(0, verbose=False)
    spilled = DigitsCNN()
    _, spy = _fit(tmp_path / "spill", spilled, policy)
    pl.seed_everything(0, verbose=False)
    reference = DigitsCNN()
    _fit(tmp_path / "plain", reference, _schedule(False))
    counters = spy.counters
    assert counters["enabled"] and counters["skipped"] == 6 and counters["entries"] == 320
    assert counters["memory"] == 100 * per_sample and counters["files"] == 4  # the 4th and 5th batch of the fill
    assert spy.spill_dir is not None and not spy.spill_dir.exists()  # deleted at teardown
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(spilled.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_rebuilds_and_verifies_the_cache(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    pl.seed_everything(0, verbose=False)
    first = DigitsCNN()
    _fit(tmp_path / "a", first, _schedule(True), epochs=3, callbacks=[checkpoints])
    saved = torch.load(tmp_path / "ckpt" / "epoch=2-step=15.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("SVCCACallback"))
    assert state["freezer"]["positions"] == {"relu1": 0, "relu2": 1}  # the prefix's layout, not its outputs
    resumed = DigitsCNN()
    _, spy = _fit(
        tmp_path / "b", resumed, _schedule(True), epochs=6, ckpt_path=tmp_path / "ckpt" / "epoch=2-step=15.ckpt"
    )
    # epoch 3 refills, epochs 4 and 5 hit: verified again before anything is skipped
    assert spy.counters["enabled"] and spy.counters["verified"] == 2 and spy.counters["skipped"] == 6
    assert torch.equal(resumed.conv2.weight, first.conv2.weight)


def test_sample_keys_are_exact_content_keys():
    x = torch.randn(4, 3, 5)
    keys = sample_keys((x,), {})
    assert len(set(keys)) == 4
    # the same sample in another batch, at another position, gets the same key
    assert sample_keys((x[[2, 0]],), {}) == [keys[2], keys[0]]
    # one bit of difference, another dtype or shape, or another non-batch argument: another key
    nudged = x.clone()
    nudged[1, 0, 0] = torch.nextafter(nudged[1, 0, 0], torch.tensor(1.0))
    assert sample_keys((nudged,), {})[1] != keys[1]
    assert sample_keys((x.double(),), {})[0] != keys[0]
    assert sample_keys((x.reshape(4, 5, 3),), {})[0] != keys[0]
    assert sample_keys((x,), {"scale": 2})[0] != keys[0]
    # every tensor argument with the batch dimension is part of the key
    assert sample_keys((x, torch.zeros(4)), {})[0] != sample_keys((x, torch.ones(4)), {})[0]
    assert sample_keys((3,), {}) is None


@pytest.mark.slow
def test_under_ddp_each_process_caches_its_own_samples(tmp_path):
    """Two gloo processes: each caches its own samples, and the weights end as without the cache."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from test_distributed import _run_worker

    cached = _run_worker(tmp_path / "cache", "cache", "--epochs", "5")
    plain = _run_worker(tmp_path / "plain", "nocache", "--epochs", "5")
    # Lightning's distributed sampler reshuffles every epoch: each process caches the samples it was given (more
    # than one epoch's 6 batches of 64, fewer than the 1200), and serves only batches it has wholly seen before
    assert all(rank["cache"]["enabled"] for rank in cached)
    assert all(384 < rank["cache"]["entries"] < 1200 for rank in cached), [rank["cache"] for rank in cached]
    assert cached[0]["frozen"] == plain[0]["frozen"] == {"relu1": 1, "relu2": 2}
    weights = torch.load(tmp_path / "cache" / "final_weights.pt"), torch.load(tmp_path / "plain" / "final_weights.pt")
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
