"""Compatibility path: ``lightning_svcca.lightning`` is :mod:`lightning_svcca.integrations.lightning`."""

from lightning_svcca.integrations.lightning import SVCCACallback

__all__ = ["SVCCACallback"]
