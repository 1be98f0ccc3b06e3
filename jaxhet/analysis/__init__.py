"""jaxhet.analysis: validation (FSC) and latent-space tools."""

from ._fsc import *  # noqa: F401,F403
from ._fsc import __all__ as _a_fsc
from ._masks import *  # noqa: F401,F403
from ._masks import __all__ as _a_masks

__all__ = [*_a_fsc, *_a_masks]
from ._plots import *  # noqa: F401,F403
from ._plots import __all__ as _a_plots

__all__ += [*_a_plots]
from ._latent import *  # noqa: F401,F403
from ._latent import __all__ as _a_latent

__all__ += [*_a_latent]
from ._metrics import *  # noqa: F401,F403
from ._metrics import __all__ as _a_metrics

__all__ += [*_a_metrics]
