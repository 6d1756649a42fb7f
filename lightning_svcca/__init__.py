"""lightning_svcca: watch each layer of a network converge while it trains, and freeze the ones that have.

The math (:func:`cca`, :func:`svcca`, :func:`pwcca`, :func:`linear_cka`) is plain torch. :class:`SVCCAMonitor`
runs it on a probe batch from any training loop; :class:`SVCCACallback` (for ``pytorch_lightning``;
``lightning_svcca.lightning.SVCCACallback`` for ``lightning.pytorch``) is the Lightning callback around it, and
:class:`SVCCATrainerCallback` (also ``lightning_svcca.huggingface.SVCCATrainerCallback``) the HuggingFace
``Trainer`` one. Converged layers can be
frozen with a :class:`FreezePolicy` and its rule (:class:`Movement`, :class:`Convergence`,
:class:`LinearSchedule`, :class:`Schedule`).

The names below are imported on first use (PEP 562): ``import lightning_svcca`` loads nothing heavy, the math and
the monitor load torch and numpy only, and Lightning, TensorBoard and matplotlib are imported when a callback, a
writer or a heatmap needs them (so the ``lightning-svcca`` command starts without torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_svcca._lazy import lazy_attributes

if TYPE_CHECKING:
    from lightning_svcca.freezing.policy import FreezePolicy, PrefixCacheOptions
    from lightning_svcca.freezing.rules import Convergence, LinearSchedule, Movement, Schedule
    from lightning_svcca.freezing.task_signal import TaskGate
    from lightning_svcca.integrations.callback import SVCCACallback
    from lightning_svcca.integrations.huggingface import SVCCATrainerCallback as SVCCATrainerCallback
    from lightning_svcca.measures import (
        CCAResult,
        Decomposition,
        MinibatchCKA,
        SimilarityWarning,
        TooFewDatapointsWarning,
        ZeroVarianceError,
        cca,
        cknna,
        decompose,
        linear_cka,
        minibatch_cka,
        mutual_knn,
        procrustes,
        pwcca,
        r2cca,
        rbf_cka,
        rsa,
        svcca,
        svcca_details,
    )
    from lightning_svcca.measures.heldout import cca_heldout, pwcca_heldout, svcca_heldout
    from lightning_svcca.monitoring.monitor import SVCCAMonitor, SVCCAMonitorWarning
    from lightning_svcca.monitoring.runtime import Runtime
    from lightning_svcca.offline.compare import compare_models
    from lightning_svcca.output.writers import TensorBoardWriter
    from lightning_svcca.pipeline.crosslayer import cross_layer_similarity

__version__ = "0.1.0"

#: Public name -> the module (or subpackage) it is imported from.
_MODULES = {
    "SVCCACallback": "integrations.callback",
    "SVCCATrainerCallback": "integrations.huggingface",  # not in __all__: transformers is optional
    "FreezePolicy": "freezing.policy",
    "PrefixCacheOptions": "freezing.policy",
    "Convergence": "freezing.rules",
    "LinearSchedule": "freezing.rules",
    "Movement": "freezing.rules",
    "Schedule": "freezing.rules",
    "TaskGate": "freezing.task_signal",
    "Runtime": "monitoring.runtime",
    "SVCCAMonitor": "monitoring.monitor",
    "SVCCAMonitorWarning": "monitoring.monitor",
    "TensorBoardWriter": "output.writers",
    "compare_models": "offline.compare",
    "cross_layer_similarity": "pipeline.crosslayer",
    "cca_heldout": "measures.heldout",
    "svcca_heldout": "measures.heldout",
    "pwcca_heldout": "measures.heldout",
    **{
        name: "measures"
        for name in (
            "CCAResult",
            "Decomposition",
            "MinibatchCKA",
            "SimilarityWarning",
            "TooFewDatapointsWarning",
            "ZeroVarianceError",
            "cca",
            "cknna",
            "decompose",
            "linear_cka",
            "minibatch_cka",
            "mutual_knn",
            "procrustes",
            "pwcca",
            "r2cca",
            "rbf_cka",
            "rsa",
            "svcca",
            "svcca_details",
        )
    },
}

__all__ = [
    "CCAResult",
    "Convergence",
    "Decomposition",
    "FreezePolicy",
    "MinibatchCKA",
    "LinearSchedule",
    "Movement",
    "PrefixCacheOptions",
    "Runtime",
    "SVCCACallback",
    "SVCCAMonitor",
    "SVCCAMonitorWarning",
    "Schedule",
    "SimilarityWarning",
    "TaskGate",
    "TensorBoardWriter",
    "TooFewDatapointsWarning",
    "ZeroVarianceError",
    "cca",
    "cca_heldout",
    "cknna",
    "compare_models",
    "cross_layer_similarity",
    "decompose",
    "linear_cka",
    "minibatch_cka",
    "mutual_knn",
    "procrustes",
    "pwcca",
    "pwcca_heldout",
    "r2cca",
    "rbf_cka",
    "rsa",
    "svcca",
    "svcca_details",
    "svcca_heldout",
]


__getattr__, __dir__ = lazy_attributes(__name__, _MODULES, globals())
