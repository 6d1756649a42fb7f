"""Compatibility path: ``lightning_svcca.similarity`` is the math of :mod:`lightning_svcca.measures`."""

from lightning_svcca.measures import *  # noqa: F403 - re-exports the public math
from lightning_svcca.measures import __all__  # noqa: F401
