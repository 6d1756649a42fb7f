"""The monitor: runs the measurement pipeline during training, for any training loop.

:class:`~lightning_svcca.monitoring.monitor.SVCCAMonitor` orchestrates one measurement in named steps (record,
snapshot, compare, store, freeze, report) over its collaborators: ``config`` (every option, declared and checked
once), ``preflight`` (the options checked against the model, the probe built), ``snapshotting`` (a probe pass to
snapshots kept by point), ``freeze_coordinator`` (the freezing steps: decide, broadcast, apply), ``outputs``
(what a run writes), ``state`` (the checkpoint format) and ``runtime`` (what a framework provides: collectives,
rank, precision context; ``process_group`` builds one for a plain ``torch.distributed`` loop). The stages
themselves live in :mod:`lightning_svcca.pipeline`, the freeze mechanics in :mod:`lightning_svcca.freezing`, and
the run's timeline (which points were measured, what "previous" and a lag mean) in :mod:`lightning_svcca.core`.
"""
