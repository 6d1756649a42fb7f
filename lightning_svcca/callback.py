"""Compatibility path: ``lightning_svcca.callback`` is :mod:`lightning_svcca.integrations.callback`."""

from lightning_svcca.integrations.callback import SVCCACallback, SVCCAMonitorWarning, _SVCCACallbackCore

__all__ = ["SVCCACallback", "SVCCAMonitorWarning", "_SVCCACallbackCore"]
