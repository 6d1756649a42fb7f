"""Reference kinds and metric properties each live in one place, and the lists kept elsewhere agree with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_svcca.pipeline.metrics import METRIC_TABLE, METRICS, metric_info, metrics_where, snapshot_needs
from lightning_svcca.pipeline.references import TIME_REFERENCES, Reference, ReferenceKind, parse_references


def test_parsed_references_carry_their_kind() -> None:
    parsed = parse_references(["previous", "initial", "final", {"pre": nn.Linear(2, 2), "feat": torch.zeros(4, 2)}])
    assert [ref.kind for ref in parsed] == [
        ReferenceKind.PREVIOUS,
        ReferenceKind.INITIAL,
        ReferenceKind.FINAL,
        ReferenceKind.MODULE,
        ReferenceKind.TENSOR,
    ]
    assert Reference("lag3", "lag", lag=3).kind is ReferenceKind.LAG  # a kind given by name
    assert ReferenceKind.LAG == "lag" and f"{ReferenceKind.LAG}" == "lag"
    with pytest.raises(ValueError, match="'later'"):
        Reference("x", "later")


@pytest.mark.parametrize(
    ("kind", "fixed", "model_pass", "from_point", "charted"),
    [
        ("previous", False, False, True, True),
        ("initial", False, False, True, True),
        ("lag", False, False, True, False),
        ("final", False, False, False, False),
        ("module", True, True, False, True),
        ("checkpoint", True, True, False, True),
        ("tensor", True, False, False, True),
    ],
)
def test_what_each_reference_kind_takes(
    kind: str, fixed: bool, model_pass: bool, from_point: bool, charted: bool
) -> None:
    member = ReferenceKind(kind)
    assert (member.fixed, member.needs_model_pass, member.from_point, member.charted) == (
        fixed,
        model_pass,
        from_point,
        charted,
    )
    assert Reference("r", member).fixed is fixed
    assert (kind in TIME_REFERENCES) is member.named


def test_metric_properties_come_from_one_table() -> None:
    assert METRICS == tuple(entry.name for entry in METRIC_TABLE) and len(set(METRICS)) == len(METRICS)
    assert metrics_where("kept_only") == ("svcca",)
    assert metrics_where("needs_right") == ("pwcca", "pwcca_heldout")
    assert set(metrics_where("held_out")) <= set(metrics_where("from_rows"))
    assert snapshot_needs(["svcca"]) == (False, False, False)
    assert snapshot_needs(["pwcca_heldout"]) == (True, True, False)
    assert metric_info("linear_cka").float32_safe
    with pytest.raises(ValueError, match="unknown metric 'svca'"):
        metric_info("svca")


def test_the_freeze_policy_takes_its_metrics_from_the_table() -> None:
    from lightning_svcca import FreezePolicy

    for metric in metrics_where("convergence"):
        assert FreezePolicy(metric=metric).metric == metric
    with pytest.raises(ValueError, match="FreezePolicy.metric must be one of"):
        FreezePolicy(metric="rbf_cka")  # in the table, but not a convergence metric
