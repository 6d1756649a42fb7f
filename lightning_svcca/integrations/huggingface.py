"""SVCCATrainerCallback: the HuggingFace ``transformers.Trainer`` glue around :class:`SVCCAMonitor`.

The Trainer calls ``on_train_begin`` (the monitor is built for the Trainer's model and measures epoch 0),
``on_step_end`` (with ``every_n_train_steps=k``: a measurement every k optimizer steps), ``on_epoch_end`` (a
measurement every ``every_n_epochs`` epochs, and freezing), ``on_save`` (the monitor's state goes into the
checkpoint folder as ``svcca_state.pt``) and ``on_train_end`` (the "final" reference). A measurement's epoch is the
number of completed epochs (the Trainer's fractional ``state.epoch`` rounded down: a run stopped at epoch 1.54 is at
epoch 1). A run resumed with ``trainer.train(resume_from_checkpoint=...)`` finds ``svcca_state.pt`` in the folder
it resumes from (see :func:`resume_folders`) and continues the history; the file is loaded with
``weights_only=True`` (tensors and plain values only), so a crafted file cannot run code. Scalars, heatmaps and
freeze events go to a TensorBoard ``SummaryWriter`` (see :func:`tensorboard_dir`); ``svcca_history.csv`` to
``args.output_dir``.

Freezing: frozen parameters get ``requires_grad=False`` (their gradients are never computed, and the Trainer's
optimizer skips them: they have no gradient). Under multi-process DDP (``torchrun``; every process decides the same
freezes at the same step) the Trainer keeps its own reference to its ``DistributedDataParallel`` wrapper, whose
reducer expects a gradient for every parameter that required one when it was built (with
``ddp_find_unused_parameters=False`` the next step fails; with ``True`` the frozen gradients are still
all-reduced). So after a freeze, the next training forward pass gives that wrapper a new reducer over the trainable
parameters (:func:`~lightning_svcca.freezing.strategies.rebuild_ddp_reducer`). Under FSDP or DeepSpeed
(``args.fsdp``, ``args.deepspeed``, ``args.parallelism_config``) frozen parameters are kept fixed by dropping their
gradients before each optimizer step (a "soft" freeze: correct, but no compute is saved), with a warning.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import Unpack, override

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("lightning_svcca.huggingface needs transformers: pip install transformers") from error

from lightning_svcca.core.safe_files import UnreadableFileError, load_plain, save_atomically, try_write
from lightning_svcca.freezing.policy import FreezePolicy
from lightning_svcca.freezing.sharded import soft_freeze_message
from lightning_svcca.freezing.strategies import rebuild_ddp_reducer
from lightning_svcca.monitoring.config import LayersArg, MetricsArg, MonitorOptions, ProbeArg, ReferenceArg
from lightning_svcca.monitoring.monitor import Runtime, SVCCAMonitor
from lightning_svcca.monitoring.options import monitor_config, takes_monitor_options
from lightning_svcca.output.writers import TensorBoardWriter
from lightning_svcca.pipeline.distributed import ProcessGroupCollective, broadcast_object
from lightning_svcca.pipeline.snapshot import LocalCollective

__all__ = ["STATE_FILE", "SVCCATrainerCallback", "completed_epochs", "tensorboard_dir"]

#: The monitor's state inside each Trainer checkpoint folder.
STATE_FILE = "svcca_state.pt"
#: The ``transformers.Trainer`` method whose ``resume_from_checkpoint`` names the folder a run resumes from.
_TRAINING_LOOP = "_inner_training_loop"


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

    def __init__(
        self,
        probe: ProbeArg,
        layers: LayersArg = None,
        reference: ReferenceArg = ("previous", "final"),
        metrics: MetricsArg = ("svcca",),
        every_n_epochs: int | None = 1,
        freeze: FreezePolicy | None = None,
        *,
        writers: Any = "tensorboard",
        **options: Unpack[MonitorOptions],
    ) -> None:
        #: The checked options (:class:`~lightning_svcca.monitoring.config.MonitorConfig`).
        self.config = monitor_config(type(self), probe, layers, reference, metrics, every_n_epochs, freeze, **options)
        if self.config.probe is None:
            raise ValueError("SVCCATrainerCallback needs a probe: a tensor, a batch (dict of tensors) or a DataLoader")
        self.writers = writers
        #: The monitor of the current training run (built in ``on_train_begin``).
        self.monitor: SVCCAMonitor | None = None
        self._writer: TensorBoardWriter | None = None
        self._norm_hook: Any = None
        self._loss_hook: Any = None
        self._losses_seen = False
        #: Set after a freeze under DDP: the next training forward rebuilds the Trainer's DDP reducer.
        self._ddp_rebuild_pending = False

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every measured value (see :attr:`SVCCAMonitor.history`)."""
        return self.monitor.history if self.monitor is not None else []

    @property
    def frozen(self) -> dict[str, int]:
        """Frozen layers -> the epoch at which they froze (see :attr:`SVCCAMonitor.frozen`)."""
        return self.monitor.frozen if self.monitor is not None else {}

    @override
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        """Build the monitor for the Trainer's model; restore a resumed run's state; measure epoch 0."""
        if model is None:
            raise RuntimeError("the Trainer passed no model to on_train_begin")
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        writers = self.writers
        if writers == "tensorboard":
            folder = tensorboard_dir(args, resumed_at=int(state.global_step))
            self._writer = TensorBoardWriter(folder) if state.is_world_process_zero else None
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
                after_freeze=self._request_ddp_rebuild,  # also one process: torchrun with 1 process gets DDP too
                max_epochs=_epochs_of(args, state),
                max_steps=int(state.max_steps) if state.max_steps and state.max_steps > 0 else None,
            ),
        )
        if state.global_step > 0:
            self._restore(args, state)
        self._ddp_rebuild_pending = False
        hard = not (distributed and _shards_parameters(args))
        if not hard and (self.config.freeze is not None or self.monitor.freezing.freezer.parameters):
            self.monitor.warn_once("soft-freeze", soft_freeze_message("the Trainer's FSDP or DeepSpeed"))
        self.monitor.restore_freezes(hard=hard)
        # the Trainer calls model.train() inside each training step: frozen norms go back to eval at each forward
        self._norm_hook = model.register_forward_pre_hook(lambda module, inputs: self._before_forward(module, state))
        # the training forward's own loss (a model given labels returns it), for the freeze rule's task gate
        self._loss_hook = model.register_forward_hook(self._after_forward)
        self._losses_seen = False
        self.monitor.start(step=int(state.global_step))

    def _restore(self, args: Any, state: Any) -> None:
        """Continue the history saved in the checkpoint folder the Trainer resumed from (tensors and values only)."""
        assert self.monitor is not None
        folders = list(dict.fromkeys(resume_folders(args, int(state.global_step))))
        saved = next((folder / STATE_FILE for folder in folders if (folder / STATE_FILE).is_file()), None)
        if saved is None:
            message = f"no {STATE_FILE} in {[str(folder) for folder in folders]}"
        else:
            try:
                self.monitor.load_state_dict(load_plain(saved))
                return
            except UnreadableFileError as error:
                message = str(error)
        self.monitor.warn_once(
            "hf-state",
            f"resumed at step {state.global_step}, but the SVCCA history cannot be continued: {message}. The"
            " history starts again from this step",
        )

    def _request_ddp_rebuild(self) -> None:
        """After a (hard) freeze: rebuild the DDP reducer at the next training forward, if it runs in DDP."""
        self._ddp_rebuild_pending = True

    def _before_forward(self, model: nn.Module, state: Any) -> None:
        """Frozen norms back in eval mode; inside the Trainer's DDP forward, a pending reducer rebuild.

        The callback never sees the Trainer's DDP wrapper, except as the active one while it runs the model's
        forward. Rebuilding there (on every process, at the first training step after the freeze, as the freeze
        itself was decided on every process at the same step) also covers freezes restored before the first step.
        """
        if self.monitor is not None:
            self.monitor.before_batch(epoch=int(state.epoch or 0))
        if self._ddp_rebuild_pending:
            wrapper = DistributedDataParallel._get_active_ddp_module()
            if wrapper is not None and wrapper.module is model:
                rebuild_ddp_reducer(wrapper, in_forward=True)
                self._ddp_rebuild_pending = False

    def _after_forward(self, model: nn.Module, inputs: Any, output: Any) -> None:
        """Report a training forward's loss (``output.loss`` or ``output["loss"]``) to the monitor."""
        if self.monitor is None or not model.training or not torch.is_grad_enabled():
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor):
            self._losses_seen = True
            self.monitor.observe_loss(loss)

    @override
    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """The Trainer's logged training loss, when the model's forward returns none (a custom ``compute_loss``)."""
        if self.monitor is not None and not self._losses_seen and logs and "loss" in logs:
            self.monitor.observe_loss(logs["loss"])

    @override
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Soft freezing only (the Trainer's FSDP or DeepSpeed): drop frozen parameters' gradients."""
        if self.monitor is not None:
            self.monitor.before_optimizer_step()

    @override
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure every ``every_n_train_steps`` optimizer steps."""
        steps = self.config.every_n_train_steps
        if self.monitor is not None and steps is not None and state.global_step % steps == 0:
            self.monitor.measure(epoch=completed_epochs(state), step=int(state.global_step))

    @override
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure after every ``every_n_epochs`` epochs (unless the step's measurement just did)."""
        every_n_epochs = self.config.every_n_epochs
        epoch = completed_epochs(state)
        if self.monitor is not None and every_n_epochs is not None and epoch % every_n_epochs == 0:
            self.monitor.measure(epoch=epoch, step=int(state.global_step))

    @override
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Put the monitor's state into the checkpoint folder the Trainer just wrote."""
        if self.monitor is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        try_write(save_atomically, self.monitor.state_dict(), folder / STATE_FILE, where=folder, warned=set())

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The final measurement and the "final" reference; release spill files, hooks and the writer."""
        if self.monitor is None:
            return
        self.monitor.finish(epoch=completed_epochs(state), step=int(state.global_step))
        self.monitor.close()
        for hook in (self._norm_hook, self._loss_hook):
            if hook is not None:
                hook.remove()
        self._norm_hook = self._loss_hook = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def resume_folders(args: Any, global_step: int) -> Iterator[Path]:
    """Where a resumed run's ``svcca_state.pt`` may be, most specific first.

    The folder given to ``trainer.train(resume_from_checkpoint=...)``: transformers hands it to no callback hook,
    so it is read from the Trainer's training-loop frame on the call stack; then ``args.resume_from_checkpoint``
    (set by scripts that take it from the command line); then ``<output_dir>/checkpoint-<global_step>``.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            given = frame.f_locals.get("resume_from_checkpoint") if frame.f_code.co_name == _TRAINING_LOOP else None
            if isinstance(given, (str, os.PathLike)):
                yield Path(given)
                break
            frame = frame.f_back
    finally:
        del frame
    if isinstance(getattr(args, "resume_from_checkpoint", None), (str, os.PathLike)):
        yield Path(args.resume_from_checkpoint)
    yield Path(args.output_dir) / f"checkpoint-{global_step}"


def completed_epochs(state: Any) -> int:
    """The epochs the Trainer has completed: its fractional ``state.epoch`` rounded down (1.54 -> 1).

    At an epoch's end ``state.epoch`` is the whole number (the Trainer adds ``steps / steps_in_epoch``, which is
    exactly 1 there); the tolerance only guards against a representation a hair below it.
    """
    return math.floor((state.epoch or 0.0) + 1e-9)


def _shards_parameters(args: Any) -> bool:
    """Whether the Trainer shards or flattens parameters (FSDP, DeepSpeed, a parallelism config) instead of DDP."""
    return bool(getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)) or (
        getattr(args, "parallelism_config", None) is not None
    )


def tensorboard_dir(args: Any, resumed_at: int = 0) -> Path:
    """Where the TensorBoard events go.

    ``args.logging_dir`` (transformers 4), else ``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/svcca``
    (beside the Trainer's own ``runs/<date>_<host>`` folders). A run resumed at global step ``resumed_at`` writes
    into ``runs/svcca/resumed_step<resumed_at>``: TensorBoard shows it as a run of its own, as Lightning's next
    logger version. In the same folder, its ``final`` curve (every measured step against the new final model)
    would sit on the first session's, at the same steps: two curves zig-zagging into one.
    """
    folder = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    if folder:
        return Path(folder)
    default = Path(args.output_dir) / "runs" / "svcca"
    return default / f"resumed_step{resumed_at}" if resumed_at > 0 else default


def _epochs_of(args: Any, state: Any) -> int | None:
    """The run's length in epochs: the Trainer's own count (from ``max_steps`` when that is given), else the args'.

    ``None`` when unknown (an iterable dataset run by ``max_steps``: the Trainer counts ``sys.maxsize`` epochs).
    """
    epochs = getattr(state, "num_train_epochs", None) or math.ceil(args.num_train_epochs)
    return int(epochs) if 0 < epochs < sys.maxsize else None
