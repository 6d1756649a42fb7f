"""Compatibility path: ``lightning_svcca.similarity`` is the math of :mod:`lightning_svcca.measures`."""

from lightning_svcca.measures.similarity import *  # noqa: F403 - re-exports the public math
from lightning_svcca.measures.similarity import __all__  # noqa: F401
