"""Cross-layer maps over a run: every layer at a few moments of training against every layer of a reference.

The SVCCA paper's Fig. 4 (Raghu et al. 2017): each layer at step t against each layer of the final model. Early
on the map is diffuse; as training goes on it sharpens along its diagonal, bottom-up. :class:`CrossLayerMoments`
keeps, for the chosen fractions of training (0, 25, 50, 75 and 100% by default), every monitored layer's
activations pooled to one datapoint per probe sample (so layers of different widths and spatial sizes compare,
as the papers do), and at the end of the run maps each moment against the reference: the final model (the
latest moment), the initial one, or a fixed reference model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_svcca.core.safe_files import (
    UnreadableFileError,
    load_plain,
    report_unreadable,
    save_atomically,
    try_write,
)
from lightning_svcca.pipeline.crosslayer import LayerMap, cross_layer_similarity

__all__ = ["CROSS_LAYER_MOMENTS", "CrossLayerMoments", "Moment"]

#: The default fractions of training at which the layers are kept for the cross-layer maps.
CROSS_LAYER_MOMENTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Moment:
    """Pooled activations of every layer at one measured point of the run."""

    fraction: float
    point: int
    epoch: int
    step: int
    layers: dict[str, Tensor]


class CrossLayerMoments:
    """The moments of a run kept for cross-layer maps, and the maps themselves.

    Args:
        fractions: fractions of training (in [0, 1]) to keep; 1 is the end of the run.
        reference: ``"final"`` (the last moment), ``"initial"`` (the first) or a fixed reference's name (its pooled
            activations given with :meth:`set_reference`).
        folder: where kept moments are written (so checkpoints hold file names only); ``None``: kept in memory
            and in the checkpoint state.
    """

    @classmethod
    def for_config(cls, config: Any) -> CrossLayerMoments | None:
        """The moments a monitor's options ask for (``cross_layer=...``), or ``None``."""
        moments = config.cross_layer_moments
        return cls(moments, config.cross_layer_reference) if moments else None

    def __init__(self, fractions: Sequence[float], reference: str, folder: Path | None = None) -> None:
        if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"cross_layer moments must be fractions of training in [0, 1], got {list(fractions)}")
        self.fractions = sorted(set(float(f) for f in fractions))
        self.reference = reference
        self.folder = folder
        self.moments: dict[float, Moment] = {}
        self.latest: Moment | None = None
        self.fixed: dict[str, Tensor] | None = None
        self._files: dict[float, Path] = {}
        self._failed: set[Path] = set()  # folders a write failed in (warned once)

    def observe(self, point: int, epoch: int, step: int, layers: Mapping[str, Tensor], total: int | None) -> None:
        """A measurement: keep it for every fraction it is the first to reach (``total``: the run's length)."""
        self.latest = Moment(1.0, point, epoch, step, dict(layers))
        for fraction in self.fractions:
            if fraction in self.moments or fraction == 1.0:
                continue
            reached = point == 0 if total is None else point >= fraction * total
            if reached or (fraction == 0.0 and not self.moments):
                moment = Moment(fraction, point, epoch, step, dict(layers))
                self.moments[fraction] = moment
                folder = self.folder
                path = None if folder is None else try_write(self._write, moment, where=folder, warned=self._failed)
                if path is not None:
                    self._files[fraction] = path
                    moment.layers = {}  # read back at the end of the run

    def set_reference(self, layers: Mapping[str, Tensor]) -> None:
        """Pooled activations of a fixed reference model."""
        self.fixed = dict(layers)

    def maps(self, metrics: Sequence[str]) -> list[tuple[Moment, LayerMap]]:
        """Every kept moment (and the last one) against the reference, per metric; ``[]`` when nothing is kept."""
        if self.latest is None:
            return []
        moments = [moment for moment in map(self._load, sorted(self.moments)) if moment.layers]  # unreadable: none
        if 1.0 in self.fractions:
            moments.append(self.latest)
        if self.reference == "final":
            target = self.latest.layers
        elif self.reference == "initial":
            target = moments[0].layers if moments else self.latest.layers
        elif self.fixed is not None:
            target = self.fixed
        else:
            return []
        results = []
        for moment in moments:
            shared = {name: rows for name, rows in moment.layers.items() if name in target}
            for metric in metrics:
                results.append((moment, cross_layer_similarity(shared, dict(target), metric)))
        return results

    def state_dict(self) -> dict[str, Any]:
        """Kept moments: file names in persistent mode, else the pooled activations."""
        state: dict[str, Any] = {}
        for fraction, moment in self.moments.items():
            entry: dict[str, Any] = {"point": moment.point, "epoch": moment.epoch, "step": moment.step}
            if fraction in self._files:
                entry["file"] = str(self._files[fraction])
            else:
                entry["layers"] = moment.layers
            state[str(fraction)] = entry
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (moments whose file is gone are dropped)."""
        self.moments.clear()
        self._files.clear()
        for key, entry in state.items():
            fraction = float(key)
            if "file" in entry:
                path = Path(entry["file"])
                if not path.is_file():
                    continue
                self._files[fraction] = path
                layers: dict[str, Tensor] = {}
            else:
                layers = dict(entry["layers"])
            self.moments[fraction] = Moment(
                fraction, int(entry["point"]), int(entry["epoch"]), int(entry["step"]), layers
            )

    def _load(self, fraction: float) -> Moment:
        moment = self.moments[fraction]
        if not moment.layers and fraction in self._files:
            try:
                moment.layers = _tensors_by_name(load_plain(self._files[fraction]), self._files[fraction])
            except UnreadableFileError as error:  # reported; the moment's map is left empty
                report_unreadable(error, f"cross-layer moment {fraction:.2f}")
        return moment

    def _write(self, moment: Moment) -> Path:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        return save_atomically(moment.layers, self.folder / f"cross_layer-{moment.fraction:.2f}.pt")


def _tensors_by_name(value: Any, path: Path) -> dict[str, Tensor]:
    """A moment file's contents, checked to be layer name -> 2-D tensor."""
    if not isinstance(value, Mapping) or not all(
        isinstance(name, str) and isinstance(rows, Tensor) and rows.ndim == 2 for name, rows in value.items()
    ):
        raise UnreadableFileError(path, "not a mapping of layer names to 2-D tensors")
    return dict(value)
