"""jaxhet.analysis: validation (FSC) and latent-space tools."""

from ._fsc import *  # noqa: F401,F403
from ._fsc import __all__ as _a_fsc

__all__ = [*_a_fsc]
