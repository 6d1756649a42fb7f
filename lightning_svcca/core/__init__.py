"""What every stage of a run shares, below all of them: the timeline, the history row, safe files, text tables.

The pipeline, the freeze training, the outputs and the monitor all speak about the same run. What they say to each
other lives here, so that each of them imports it from below instead of from a sibling or a layer above:

- :mod:`~lightning_svcca.core.timeline`: :class:`~lightning_svcca.core.timeline.Timeline`, the run's measured
  points and each one's ``(epoch, step)``; the lag arithmetic (``fraction_lag``); ``evenly_spaced``.
- :mod:`~lightning_svcca.core.rows`: the history row (``row``, its columns, the ``frozen``/``dims``/``baseline``
  slots, the freeze metric).
- :mod:`~lightning_svcca.core.safe_files`: every file the package reads loaded with ``weights_only=True``, every
  file it writes written atomically.
- :mod:`~lightning_svcca.core.table`: plain-text tables (no torch).

It imports nothing of the package but the warning base class of :mod:`lightning_svcca.measures`; importing this
package loads no torch (``lightning-svcca summary`` reads the row schema and tables without it).
"""
