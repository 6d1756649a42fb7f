"""One measurement, stage by stage, and the monitor that runs it during training.

In run order: the probe batch (``probe``), which layers (``layers``), the forward hooks that record them
(``recording``) and how their outputs become rows (``reduction``), one recorded probe pass (``capture``), each
layer compressed to a snapshot (``snapshot``) and kept within a memory budget (``store``), what each snapshot is
compared with (``references``, ``comparisons``) and the metrics of a comparison (``metrics``), the cross-layer maps
at fractions of the run (``moments``), and
:class:`~lightning_svcca.pipeline.monitor.SVCCAMonitor`, which orchestrates the stages for any training loop.
``config`` checks every option once; ``distributed`` shards the probe across processes.
"""
