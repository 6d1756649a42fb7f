"""One measurement, stage by stage: from a probe batch to values comparing each layer with its references.

In run order: the probe batch (``probe``), which layers (``layers``), the forward hooks that record them
(``recording``) and how their outputs become ``(datapoints, features)`` rows (``reduction``), one recorded probe
pass (``capture``, sharded across processes by ``distributed``), each layer compressed to a snapshot
(``snapshot``) and kept within a memory budget (``store``), what each snapshot is compared with (``references``,
``comparisons``) and the values of a comparison (``metrics``), layers x layers maps (``crosslayer``) and the
cross-layer maps at fractions of the run (``moments``). :mod:`lightning_svcca.monitoring` runs these stages during
training.
"""
