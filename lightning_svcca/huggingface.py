"""Compatibility path: ``lightning_svcca.huggingface`` is :mod:`lightning_svcca.integrations.huggingface`."""

from lightning_svcca.integrations.huggingface import SVCCATrainerCallback

__all__ = ["SVCCATrainerCallback"]
