"""jaxhet.inference: algorithms over the core and the models (reconstruction, EM, ab initio, ...)."""

from ._reconstruct import *  # noqa: F401,F403
from ._reconstruct import __all__ as _a_reconstruct

__all__ = [*_a_reconstruct]
from ._vae import *  # noqa: F401,F403
from ._vae import __all__ as _a_vae

__all__ += [*_a_vae]
from ._classify import *  # noqa: F401,F403
from ._classify import __all__ as _a_classify

__all__ += [*_a_classify]
from ._em import *  # noqa: F401,F403,E402
from ._em import __all__ as _a_em  # noqa: E402

__all__ += [*_a_em]
from ._multibody import *  # noqa: F401,F403
from ._multibody import __all__ as _a_multibody

__all__ += [*_a_multibody]
from ._abinitio import *  # noqa: F401,F403,E402
from ._abinitio import __all__ as _a_abinitio  # noqa: E402

__all__ += [*_a_abinitio]
from ._linear import *  # noqa: F401,F403,E402
from ._linear import __all__ as _a_linear  # noqa: E402
from ._spectral import *  # noqa: F401,F403,E402
from ._spectral import __all__ as _a_spectral  # noqa: E402

__all__ += [*_a_linear, *_a_spectral]
