"""Replay freeze rules over recorded SVCCA histories: when would each rule freeze each layer?

The histories come from ``freeze_recording.py`` (no freezing; every layer at every epoch against every earlier
epoch, in the library's history-row format). A rule is a function of the rows up to an epoch; the replay walks
the epochs, applies the bottom-up order and ``keep_last=1`` as ``FreezePolicy._admissible`` does, and prints per
workload and rule the epoch at which each layer would freeze, the share of layer-epochs frozen, and the epoch at
which the unfrozen baseline first came within 0.3 points of its final test accuracy (a freeze after that epoch
saves little).

Rules replayed:

* ``defaults``: ``FreezePolicy()`` today: ``s(t, t-5) >= 0.99``, once.
* ``noise-aware``: the same on ``(s - b) / (1 - b)`` with ``b`` the shuffled baseline.
* ``preset``: ``FreezePolicy.for_fine_tuning()``: ``s(t, t-1) >= 0.99`` twice in a row, ``keep_last=2``.
* ``movement f=F th=T p=P``: :func:`decide_scale_free`, ``FreezePolicy()``'s rule (``mode="movement"``; the
  constants are chosen in ``docs/freezing.md``, "The default rule").

Run: ``python benchmarks/freeze_rule_replay.py [--histories DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: ``FreezePolicy()``'s constants (chosen from these replays: docs/freezing.md, "The default rule").
LAG_FRACTION = 0.5
THRESHOLD = 0.75
PATIENCE = 1
#: Below this total movement ``1 - s(t, 0)`` a layer has not moved at all (nothing of its own trains).
UNMOVED = 1e-9

Rows = Sequence[Mapping[str, Any]]
Rule = Callable[[Rows, Sequence[str], int, Mapping[str, int]], list[str]]


def lag_for(epoch: int, fraction: float = LAG_FRACTION) -> int:
    """The lag, in epochs (or measurements), a ``fraction`` of the elapsed run: at least 1."""
    return max(1, int(fraction * epoch + 0.5))


def value_at(rows: Rows, epoch: int, layer: str, reference: str, metric: str = "svcca") -> float | None:
    """The row value of ``layer`` at ``epoch`` against ``reference``, or ``None``."""
    for row in rows:
        if (
            row["epoch"] == epoch
            and row["layer"] == layer
            and row["reference"] == reference
            and row["metric"] == metric
        ):
            return float(row["value"])
    return None


def normalised_movement(rows: Rows, layer: str, epoch: int, fraction: float = LAG_FRACTION) -> float | None:
    """``rho = r * (t / lag)**2``: :func:`movement_ratio` against its value for a layer moving at a steady speed.

    ``1 - SVCCA`` grows as the square of a small displacement, so a layer moving at a constant speed has
    ``r = (lag / t)**2``: ``rho`` is 1 for steady movement, near 0 for a layer that has stopped, and does not
    jump with the rounding of ``lag`` from one measurement to the next.
    """
    ratio = movement_ratio(rows, layer, epoch, fraction)
    return None if ratio is None else ratio * (epoch / lag_for(epoch, fraction)) ** 2


def movement_ratio(rows: Rows, layer: str, epoch: int, fraction: float = LAG_FRACTION) -> float | None:
    """``r = (1 - s(t, t - lag)) / (1 - s(t, 0))``: the layer's recent movement over its movement since the start.

    ``lag = max(1, round(fraction * t))``. Returns 0 for a layer that has not moved at all since the start
    (``1 - s(t, 0) < UNMOVED``: nothing of its own trains), ``None`` when a needed row is missing or the lag reaches
    back to the first snapshot (``t <= lag``: ``r = 1`` by definition).
    """
    lag = lag_for(epoch, fraction)
    recent = value_at(rows, epoch, layer, "previous" if lag == 1 else f"lag{lag}")
    total = value_at(rows, epoch, layer, "initial")
    if recent is None or total is None or math.isnan(recent) or math.isnan(total):
        return None
    if 1.0 - total < UNMOVED:
        return 0.0
    if lag >= epoch:  # the lagged snapshot is the first: r = 1 by definition, not judged (as in FreezePolicy)
        return None
    return max(0.0, 1.0 - recent) / (1.0 - total)


def decide_scale_free(
    history_rows: Rows,
    layers: Sequence[str],
    epoch: int,
    frozen: Mapping[str, int] | None = None,
    *,
    fraction: float = LAG_FRACTION,
    threshold: float = THRESHOLD,
    patience: int = PATIENCE,
    keep_last: int = 1,
) -> list[str]:
    """Layers to freeze after ``epoch`` under the scale-free convergence rule, bottom-up.

    A layer is converged at a measurement ``t`` when ``rho(t) = (1 - s(t, t - lag)) / (1 - s(t, 0)) * (t / lag)**2``
    is below ``threshold``, with ``lag = max(1, round(fraction * t))`` (:func:`normalised_movement`: 1 for a
    layer moving at a steady speed, 0 for one that has stopped), and it is ready when that held at its last
    ``patience`` measurements. Ready layers freeze as a prefix: a layer freezes only when every layer below
    it is frozen or freezes now; the top ``keep_last`` layers never freeze.

    Args:
        history_rows: history rows (dicts with epoch, layer, reference, metric, value) holding, per layer and
            measured epoch, the references ``initial`` and ``lag{k}`` (``previous`` for ``k = 1``).
        layers: monitored layers in forward order.
        epoch: the measurement just taken (completed epochs).
        frozen: layers already frozen -> epoch.
        fraction: the lag as a fraction of the elapsed run.
        threshold: ``rho`` below this counts as converged.
        patience: consecutive converged measurements needed.
        keep_last: top layers never frozen.

    Returns:
        The layers to freeze now, bottom-up.
    """
    frozen = frozen or {}
    measured = sorted({int(row["epoch"]) for row in history_rows if row["epoch"] <= epoch})
    recent = measured[-patience:]
    decisions: list[str] = []
    for index, layer in enumerate(layers):
        if layer in frozen:
            continue
        if index >= len(layers) - keep_last or len(recent) < patience:
            break
        ratios = [normalised_movement(history_rows, layer, t, fraction) for t in recent]
        if not all(r is not None and r < threshold for r in ratios):
            break
        decisions.append(layer)
    return decisions


def _threshold_rule(reference: Callable[[int], str], threshold: float, patience: int, noise: bool) -> Rule:
    """Today's convergence mode: the similarity to an earlier snapshot at or above ``threshold``."""

    def rule(rows: Rows, layers: Sequence[str], epoch: int, frozen: Mapping[str, int]) -> list[str]:
        def converged(layer: str, t: int) -> bool:
            value = value_at(rows, t, layer, reference(t))
            base = value_at(rows, t, layer, "baseline") if noise else None
            if value is None:
                return False
            if base is not None and base < 1.0:
                value = (value - base) / (1.0 - base)
            return value >= threshold

        decisions = []
        for layer in layers[:-1]:
            if layer in frozen:
                continue
            if epoch < patience or not all(converged(layer, t) for t in range(epoch - patience + 1, epoch + 1)):
                break
            decisions.append(layer)
        return decisions

    return rule


def candidates() -> dict[str, Rule]:
    """The rules replayed, by name."""
    rules: dict[str, Rule] = {
        "defaults (lag 5, 0.99)": _threshold_rule(lambda t: "lag5", 0.99, 1, noise=False),
        "noise-aware defaults": _threshold_rule(lambda t: "lag5", 0.99, 1, noise=True),
        "preset (lag 1, 0.99, p2)": _threshold_rule(lambda t: "previous", 0.99, 2, noise=False),
    }
    for threshold in (0.05, 0.1):  # the unnormalised ratio r (lag 1 until t = 5: about a 1/t**2 time trigger)
        rules[f"raw r f=0.25 th={threshold} p=1"] = lambda rows, layers, epoch, frozen, th=threshold: _raw(
            rows, layers, epoch, frozen, th
        )
    for fraction in (0.25, 0.5):
        for threshold in (0.25, 0.5, 0.75, 1.0):
            for patience in (1, 2):
                name = f"movement f={fraction} th={threshold} p={patience}"
                rules[name] = lambda rows, layers, epoch, frozen, f=fraction, th=threshold, p=patience: (
                    decide_scale_free(rows, layers, epoch, frozen, fraction=f, threshold=th, patience=p)
                )
    for threshold in (1.5, 2.0, 2.5):  # above a steady pace: how early must (c) freeze, and what else freezes then
        rules[f"movement f=0.5 th={threshold} p=1"] = lambda rows, layers, epoch, frozen, th=threshold: (
            decide_scale_free(rows, layers, epoch, frozen, fraction=0.5, threshold=th, patience=1)
        )
    return rules


def _raw(rows: Rows, layers: Sequence[str], epoch: int, frozen: Mapping[str, int], threshold: float) -> list[str]:
    """Bottom-up prefix of the layers whose unnormalised ``r`` (lag 0.25 t) is below ``threshold``."""
    decisions = []
    for layer in layers[:-1]:
        if layer in frozen:
            continue
        ratio = movement_ratio(rows, layer, epoch, 0.25)
        if ratio is None or ratio >= threshold:
            break
        decisions.append(layer)
    return decisions


def replay(history: Mapping[str, Any], rule: Rule) -> dict[str, int]:
    """Walk the recorded epochs; return layer -> the epoch after which the rule freezes it."""
    layers, rows = history["layers"], history["rows"]
    frozen: dict[str, int] = {}
    for epoch in range(1, history["epochs"] + 1):
        seen = [row for row in rows if row["epoch"] <= epoch]
        for layer in rule(seen, layers, epoch, frozen):
            frozen[layer] = epoch
    return frozen


def plateau_epoch(history: Mapping[str, Any], tolerance: float = 0.003) -> int:
    """The first epoch whose test accuracy is within ``tolerance`` of the final one."""
    accuracy = history["accuracy"]
    return next(i + 1 for i, value in enumerate(accuracy) if value >= accuracy[-1] - tolerance)


def ratio_table(history: Mapping[str, Any], fraction: float = LAG_FRACTION) -> str:
    """Per layer and epoch, ``rho`` of the scale-free rule (the data that chose its threshold)."""
    lines = [
        f"  rho = (1 - s(t, t-lag)) / (1 - s(t, 0)) * (t/lag)^2, lag = {fraction} t; epochs 1..{history['epochs']}"
    ]
    for layer in history["layers"]:
        values = [normalised_movement(history["rows"], layer, t, fraction) for t in range(1, history["epochs"] + 1)]
        text = " ".join("  -  " if v is None else f"{v:5.3f}" for v in values)
        total = value_at(history["rows"], history["epochs"], layer, "initial")
        moved = 1 - total if total is not None else math.nan
        lines.append(f"  {layer.split('.')[-1]:<12} {text}   1-s(T,0)={moved:.2e}")
    return "\n".join(lines)


def report(histories: list[Mapping[str, Any]]) -> str:
    """For each history: its accuracy curve, the ratio table, and each rule's freeze epochs."""
    lines = []
    for history in histories:
        epochs, layers = history["epochs"], history["layers"]
        names = ", ".join(layer.split(".")[-1] for layer in layers[:-1])
        accuracy = " ".join(f"{100 * a:.1f}" for a in history["accuracy"])
        lines += [
            "",
            f"({history['workload']}) seed {history['seed']}: {epochs} epochs, test accuracy by epoch {accuracy};"
            f" within 0.3 points of final from epoch {plateau_epoch(history)}",
            ratio_table(history),
            f"  {'rule':<34} {'frozen layer-epochs':>19}  freeze epoch per layer ({names})",
        ]
        for name, rule in candidates().items():
            frozen = replay(history, rule)
            share = sum(epochs - e for e in frozen.values()) / (epochs * (len(layers) - 1))
            per_layer = " ".join(f"{frozen.get(layer, '-'):>3}" for layer in layers[:-1])
            lines.append(f"  {name:<34} {share:>19.0%}  {per_layer}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Load the histories and print the replay."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--histories", type=Path, default=Path(__file__).resolve().parent / "freeze_histories")
    args = parser.parse_args(argv)
    histories = [json.loads(path.read_text()) for path in sorted(args.histories.glob("*.json"))]
    text = report(histories)
    print(text)
    return text


if __name__ == "__main__":
    main()
