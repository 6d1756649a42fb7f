"""The monitor's options are declared once (MonitorConfig) and reach every adapter: signature, docs, LightningCLI."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_svcca import FreezePolicy, SVCCACallback, SVCCAMonitor
from lightning_svcca.monitoring.config import LayersArg, MonitorConfig, MonitorOptions, ProbeArg, ReferenceArg
from lightning_svcca.monitoring.options import takes_monitor_options, with_option_docs

OPTIONS = [f.name for f in dataclasses.fields(MonitorConfig) if f.init]
NAMESPACES = [
    ("pytorch_lightning.cli", "pytorch_lightning.demos.boring_classes", "lightning_svcca.SVCCACallback"),
    ("lightning.pytorch.cli", "lightning.pytorch.demos.boring_classes", "lightning_svcca.lightning.SVCCACallback"),
]


class Pairs(Dataset):
    """``(features, label)`` pairs shaped for BoringModel (32 features), so ``probe_input`` has a part to pick."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.randn(32, generator=torch.Generator().manual_seed(index)), index % 2


class PairsLoader(DataLoader):
    """A DataLoader over :class:`Pairs` that a LightningCLI config names by class path."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__(Pairs(), batch_size=batch_size)


def call_model(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """A ``forward_fn`` that LightningCLI can name by its import path: the model on a batch's features."""
    return model(batch[0])


def _adapters() -> list[type]:
    from lightning_svcca.huggingface import SVCCATrainerCallback
    from lightning_svcca.lightning import SVCCACallback as LightningSVCCACallback

    return [SVCCACallback, LightningSVCCACallback, SVCCATrainerCallback]


def _doc_entries(doc: str) -> dict[str, str]:
    """An ``Args:`` section's entries by name, each as one line of text."""
    args = inspect.cleandoc(doc).split("Args:\n", 1)[1]
    return {name: " ".join(text.split()) for name, text in re.findall(r"(?m)^    (\w+): (.*(?:\n {8}.*)*)", args)}


@pytest.mark.parametrize("adapter", _adapters(), ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_each_adapter_shows_every_option_as_monitorconfig_declares_it(adapter):
    config = inspect.signature(MonitorConfig).parameters
    parameters = inspect.signature(adapter).parameters
    assert list(parameters)[: len(OPTIONS)] == OPTIONS
    for name in OPTIONS:
        expected = config[name].default if name != "probe" or adapter.__name__ == "SVCCACallback" else inspect._empty
        assert parameters[name].default == expected, name
        assert parameters[name].kind == config[name].kind, name
        assert not isinstance(parameters[name].annotation, str), name  # evaluated, for jsonargparse
    own = {"SVCCACallback": ["probe_autocast"], "SVCCATrainerCallback": ["writers"]}[adapter.__name__]
    assert list(parameters)[len(OPTIONS) :] == own
    docs = _doc_entries(adapter.__doc__)
    assert list(docs) == [*OPTIONS, *own]
    option_docs = _doc_entries(MonitorConfig.__doc__)
    replaced = {"probe"} if adapter.__name__ == "SVCCATrainerCallback" else set()
    assert all(docs[name] == option_docs[name] for name in OPTIONS if name not in replaced)


def test_positional_and_keyword_construction_as_before():
    policy = FreezePolicy(mode="convergence", lag=2)
    probe = torch.randn(16, 32)
    callback = SVCCACallback(probe, ["layer"], "previous", ["svcca", "pwcca"], 2, policy, keep=0.9, probe_autocast=True)
    assert callback.config.probe is probe and callback.config.layers == ["layer"]
    assert callback.config.reference == "previous" and callback.config.metrics == ("svcca", "pwcca")
    assert callback.config.every_n_epochs == 2 and callback.config.freeze is policy and callback.config.keep == 0.9
    assert callback.probe_autocast is True
    with pytest.raises(TypeError, match="probe_sise"):
        SVCCACallback(probe_sise=32)
    with pytest.raises(TypeError, match="positional"):
        SVCCACallback(None, None, "previous", "svcca", 1, None, 1024)  # the rest are keyword-only, as before


def test_monitor_options_typeddict_has_monitorconfigs_keyword_only_fields_and_types():
    """What a type checker reads (``**options: Unpack[MonitorOptions]``) is what MonitorConfig takes."""
    config = inspect.signature(MonitorConfig).parameters
    keyword_only = [name for name in OPTIONS if config[name].kind is inspect.Parameter.KEYWORD_ONLY]
    assert list(MonitorOptions.__annotations__) == keyword_only and not MonitorOptions.__total__
    hints = typing.get_type_hints(MonitorConfig)
    assert typing.get_type_hints(MonitorOptions) == {name: hints[name] for name in keyword_only}
    for adapter in [SVCCAMonitor, *_adapters()]:
        written = typing.get_type_hints(adapter.__init__)
        assert all(written[name] == hints[name] for name in OPTIONS[:6]), adapter


@pytest.mark.parametrize("cls", [SVCCAMonitor, *_adapters()], ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_a_misspelled_keyword_names_the_class_and_the_closest_argument(cls):
    first = (torch.nn.Linear(2, 2),) if cls is SVCCAMonitor else (torch.randn(8, 2),)
    with pytest.raises(
        TypeError,
        match=rf"^{cls.__name__}\(\) got an unexpected keyword argument 'every_n_epoch'; did"
        r" you mean 'every_n_epochs'\?$",
    ):
        cls(*first, every_n_epoch=2)
    own = {"SVCCAMonitor": "writers", "SVCCACallback": "probe_autocast", "SVCCATrainerCallback": "writers"}
    misspelled = own[cls.__name__][:-1]
    with pytest.raises(TypeError, match=f"did you mean '{own[cls.__name__]}'"):
        cls(*first, **{misspelled: None})


def test_an_option_written_out_otherwise_than_monitorconfig_has_it_is_refused():
    class Wrong:
        def __init__(
            self, probe: ProbeArg = None, layers: LayersArg = None, reference: ReferenceArg = "previous", **options
        ) -> None: ...

    with pytest.raises(
        TypeError,
        match="writes out reference: .* = 'previous' where MonitorConfig has reference: .* = \\('previous', 'final'\\)",
    ):
        takes_monitor_options()(Wrong)


@pytest.mark.parametrize("cls", _adapters(), ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_hook_is_marked_override(cls):
    own = next(c for c in cls.__mro__ if "__init__" in vars(c))  # where the hooks are (the core, for Lightning's)
    base = next(c for c in cls.__mro__ if c.__name__ in ("Callback", "TrainerCallback"))
    members = vars(own).items()
    hooks = {name: getattr(m, "fget", m) for name, m in members if hasattr(base, name) and not name.startswith("__")}
    assert len(hooks) >= 6 and all(getattr(hook, "__override__", False) for hook in hooks.values()), hooks


def test_an_adapter_entry_replaces_the_options_own_and_extras_follow():
    own = "Summary.\n\n    Args:\n        extra: mine.\n        layers: said here.\n\n    Example:\n        x\n"
    doc = with_option_docs(own)
    entries = _doc_entries(doc)
    assert list(entries) == [*OPTIONS, "extra"] and entries["layers"] == "said here."
    assert doc.startswith("Summary.\n\nArgs:\n") and doc.endswith("\n\nExample:\n    x\n")


def _every_option(tmp_path) -> dict:
    """A value other than the default for every option of the callback, as a LightningCLI config writes it."""
    return {
        "probe": {
            "class_path": f"{__name__}.PairsLoader",
            "init_args": {"batch_size": 16},
        },
        "layers": {"layer": {"reduction": "flatten"}},
        "reference": ["previous", "initial"],
        "metrics": ["svcca", "linear_cka"],
        "every_n_epochs": 2,
        "freeze": {"mode": "convergence", "threshold": 0.5, "lag": 2, "metric": "linear_cka"},
        "every_n_train_steps": 3,
        "probe_size": 48,
        "probe_batch_size": 16,
        "probe_input": 0,
        "probe_mask": False,
        "probe_seed": 7,
        "forward_fn": f"{__name__}.call_model",
        "reduction": "mean",
        "max_datapoints": 512,
        "keep": 0.9,
        "keep_by": "variance",
        "baseline": False,
        "max_snapshot_bytes": 1_000_000,
        "shard_probe": False,
        "compute_dtype": "float32",
        "cross_layer": [0.0, 1.0],
        "cross_layer_reference": "initial",
        "heatmap_time_share": 0.5,
        "probe_autocast": True,
    }


@pytest.mark.parametrize(("cli_module", "demos_module", "class_path"), NAMESPACES)
def test_lightning_cli_sets_every_option(tmp_path, cli_module, demos_module, class_path):
    pytest.importorskip("jsonargparse")
    cli_class = importlib.import_module(cli_module).LightningCLI
    boring = importlib.import_module(demos_module).BoringModel
    options = _every_option(tmp_path)
    assert set(options) == set(inspect.signature(SVCCACallback).parameters)  # a new option joins this test
    trainer_args = {
        "callbacks": [{"class_path": class_path, "init_args": options}],
        "default_root_dir": str(tmp_path),
        "max_epochs": 2,
        "limit_train_batches": 3,
        "limit_val_batches": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    cli = cli_class(boring, run=False, args={"trainer": trainer_args}, save_config_callback=None)
    svcca = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SVCCACallback")
    assert type(svcca).__module__ == importlib.import_module(class_path.rpartition(".")[0]).SVCCACallback.__module__
    config = svcca.config
    assert isinstance(config.probe, PairsLoader) and config.probe.batch_size == 16
    assert config.freeze == FreezePolicy(mode="convergence", threshold=0.5, lag=2, metric="linear_cka")
    assert config.forward_fn is call_model
    assert config.metrics == ("svcca", "linear_cka")  # MonitorConfig makes a tuple of the list
    assert svcca.probe_autocast is True
    skip = {"probe", "freeze", "forward_fn", "metrics", "probe_autocast"}
    for name, value in options.items():
        if name not in skip:
            got = getattr(config, name)
            assert (list(got) if isinstance(got, tuple) else got) == value, name
    cli.trainer.fit(cli.model)  # and the options work together
    assert sorted({row["step"] for row in svcca.history if row["reference"] == "previous"}) == [3, 6]


@pytest.mark.parametrize(("cli_module", "demos_module", "class_path"), NAMESPACES)
def test_lightning_cli_help_shows_each_options_doc(capsys, cli_module, demos_module, class_path):
    pytest.importorskip("jsonargparse")
    cli_class = importlib.import_module(cli_module).LightningCLI
    boring = importlib.import_module(demos_module).BoringModel
    with pytest.raises(SystemExit):
        cli_class(boring, run=False, args=["--trainer.callbacks.help", class_path])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines, and breaks long words
    adapter = importlib.import_module(class_path.rpartition(".")[0]).SVCCACallback
    for name, doc in _doc_entries(adapter.__doc__).items():
        assert re.search(rf"--trainer\.callbacks\.{name}({name.upper()}|{{true,false}})", shown), name
        assert "".join(doc.split()) in shown, name  # the whole entry


@pytest.mark.parametrize(
    "freeze",
    [
        {"rule": {"class_path": "lightning_svcca.Schedule", "init_args": {"epochs": {"layer": 1}}}, "keep_last": 0},
        {"rule": {"class_path": "Schedule", "init_args": {"epochs": {"layer": 1}}}, "keep_last": 0, "cache": {}},
        {"mode": "schedule", "schedule": {"layer": 1}, "keep_last": 0, "cache_outputs": True, "cache_key": "index"},
    ],
    ids=["class_path", "short_class_name", "shorthand"],
)
def test_lightning_cli_writes_a_policy_with_its_rule(tmp_path, freeze, request):
    """A rule by class path or short name, the cache options as a mapping, or the first form's shorthand."""
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_svcca import PrefixCacheOptions, Schedule, TaskGate

    callback = {"class_path": "lightning_svcca.lightning.SVCCACallback", "init_args": {"freeze": freeze}}
    trainer_args = {"callbacks": [callback], "default_root_dir": str(tmp_path), "logger": False}
    cli = LightningCLI(BoringModel, run=False, args={"trainer": trainer_args}, save_config_callback=None)
    [svcca] = [c for c in cli.trainer.callbacks if type(c).__name__ == "SVCCACallback"]
    cache = {"class_path": None, "short_class_name": PrefixCacheOptions(), "shorthand": PrefixCacheOptions(key="index")}
    assert svcca.config.freeze == FreezePolicy(
        Schedule({"layer": 1}), keep_last=0, cache=cache[request.node.callspec.id]
    )
    assert svcca.config.freeze.task == TaskGate()
