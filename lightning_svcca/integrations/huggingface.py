"""SVCCATrainerCallback: the HuggingFace ``transformers.Trainer`` glue around :class:`SVCCAMonitor`.

The Trainer calls ``on_train_begin`` (the monitor is built for the Trainer's model and measures epoch 0),
``on_epoch_end`` (a measurement, and freezing), ``on_save`` (the monitor's state goes into the checkpoint folder
as ``svcca_state.pt``) and ``on_train_end`` (the "final" reference). A run resumed with
``trainer.train(resume_from_checkpoint=...)`` finds ``svcca_state.pt`` in ``output_dir/checkpoint-<global_step>``
and continues the history. Scalars, heatmaps and freeze events go to a TensorBoard ``SummaryWriter`` (see
:func:`tensorboard_dir`); ``svcca_history.csv`` to ``args.output_dir``.

Freezing: on one process, frozen parameters get ``requires_grad=False`` (their gradients are never computed, and
the Trainer's optimizer skips them: they have no gradient). Under multi-process DDP the Trainer's DDP wrapper
cannot be rebuilt from a callback, so frozen parameters are kept fixed by dropping their gradients before each
optimizer step (a "soft" freeze: correct, but no compute is saved).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("lightning_svcca.huggingface needs transformers: pip install transformers") from error

from lightning_svcca.integrations.options import takes_monitor_options
from lightning_svcca.monitoring.config import MonitorConfig
from lightning_svcca.monitoring.monitor import Runtime, SVCCAMonitor
from lightning_svcca.output.writers import TensorBoardWriter
from lightning_svcca.pipeline.distributed import ProcessGroupCollective, broadcast_object
from lightning_svcca.pipeline.snapshot import LocalCollective

__all__ = ["STATE_FILE", "SVCCATrainerCallback"]

#: The monitor's state inside each Trainer checkpoint folder.
STATE_FILE = "svcca_state.pt"


@takes_monitor_options(required=("probe",))
class SVCCATrainerCallback(TrainerCallback):
    """Measure SVCCA (and friends) per layer while a HuggingFace ``Trainer`` trains; optionally freeze layers.

    Every option of :class:`~lightning_svcca.monitoring.config.MonitorConfig` is an argument (the first six also by
    position), plus ``writers``.

    Args:
        probe: a tensor, a batch (a dict of tensors is called as ``model(**batch)`` unless ``forward_fn`` says
            otherwise) or a DataLoader. Required: the Trainer's datasets hold no fixed probe.
        writers: ``"tensorboard"`` (default: a ``SummaryWriter``, see :func:`tensorboard_dir`), ``None``, or writers
            as :class:`~lightning_svcca.SVCCAMonitor` takes them.
    """

    def __init__(self, *args: Any, writers: Any = "tensorboard", **options: Any) -> None:
        #: The checked options (:class:`~lightning_svcca.monitoring.config.MonitorConfig`).
        self.config = MonitorConfig(*args, **options)
        if self.config.probe is None:
            raise ValueError("SVCCATrainerCallback needs a probe: a tensor, a batch (dict of tensors) or a DataLoader")
        self.writers = writers
        #: The monitor of the current training run (built in ``on_train_begin``).
        self.monitor: SVCCAMonitor | None = None
        self._writer: TensorBoardWriter | None = None
        self._norm_hook: Any = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every measured value (see :attr:`SVCCAMonitor.history`)."""
        return self.monitor.history if self.monitor is not None else []

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        """Build the monitor for the Trainer's model; restore a resumed run's state; measure epoch 0."""
        if model is None:
            raise RuntimeError("the Trainer passed no model to on_train_begin")
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        writers = self.writers
        if writers == "tensorboard":
            self._writer = TensorBoardWriter(tensorboard_dir(args)) if state.is_world_process_zero else None
            writers = self._writer
        self.monitor = SVCCAMonitor.from_config(
            model,
            self.config,
            writers=writers if state.is_world_process_zero else None,
            log_dir=args.output_dir,
            runtime=Runtime(
                collective=ProcessGroupCollective() if distributed else LocalCollective(),
                is_global_zero=bool(state.is_world_process_zero),
                broadcast=broadcast_object,
                max_epochs=int(args.num_train_epochs),
            ),
        )
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if state.global_step > 0 and saved.is_file():
            self.monitor.load_state_dict(torch.load(saved, map_location="cpu", weights_only=False))
        self.monitor.restore_freezes(hard=not distributed)
        # the Trainer calls model.train() inside each training step: frozen norms go back to eval at each forward
        self._norm_hook = model.register_forward_pre_hook(
            lambda module, inputs: self.monitor.before_batch(epoch=int(state.epoch or 0))
        )
        self.monitor.start(step=int(state.global_step))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Soft freezing only (multi-process): drop frozen parameters' gradients."""
        if self.monitor is not None:
            self.monitor.before_optimizer_step()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure after each epoch (``every_n_epochs``)."""
        if self.monitor is not None and state.epoch is not None:
            self.monitor.measure(epoch=round(state.epoch), step=int(state.global_step))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Put the monitor's state into the checkpoint folder the Trainer just wrote."""
        if self.monitor is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.monitor.state_dict(), folder / STATE_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The final measurement and the "final" reference; release spill files, hooks and the writer."""
        if self.monitor is None:
            return
        self.monitor.finish(epoch=round(state.epoch or 0), step=int(state.global_step))
        self.monitor.close()
        if self._norm_hook is not None:
            self._norm_hook.remove()
            self._norm_hook = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tensorboard_dir(args: Any) -> Path:
    """Where the TensorBoard events go.

    ``args.logging_dir`` (transformers 4), else ``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/svcca``
    (beside the Trainer's own ``runs/<date>_<host>`` folders).
    """
    folder = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    return Path(folder) if folder else Path(args.output_dir) / "runs" / "svcca"
