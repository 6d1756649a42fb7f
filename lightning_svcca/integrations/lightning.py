"""SVCCACallback for users of the ``lightning`` package (``lightning.pytorch``), over the same core."""

try:
    from lightning.pytorch import Callback
except ImportError as error:  # pragma: no cover - exercised only without the lightning package
    raise ImportError("lightning_svcca.lightning needs the `lightning` package: pip install lightning") from error

from lightning_svcca.integrations.callback import _SVCCACallbackCore


# The ignore: to a type checker the core is a pytorch_lightning Callback (what its hooks' @override is
# checked against), whose hooks annotate pytorch_lightning's Trainer where lightning.pytorch's annotate their own
class SVCCACallback(_SVCCACallbackCore, Callback):  # type: ignore[misc]  # noqa: D101 - the docstring is the core's
    __doc__ = _SVCCACallbackCore.__doc__
