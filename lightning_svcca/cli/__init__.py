"""The ``lightning-svcca`` command: tables and heatmaps from saved history CSVs, and ``compare`` for checkpoints.

Reading histories imports no torch, so the command starts fast.
"""

from lightning_svcca.cli.main import main

__all__ = ["main"]
