"""jaxhet.models: hyper-molecule volume models V(tau, k) (Flax NNX), encoders, registry.

Every model answers ``fourier(tau, k[..., 3] in 1/A)``; see :mod:`jaxhet.models._base`
for the interface and how to register a new model.
"""

from ._base import *  # noqa: F401,F403
from ._base import __all__ as _a_base
from ._voxel import *  # noqa: F401,F403
from ._voxel import __all__ as _a_voxel
from ._mlp import *  # noqa: F401,F403
from ._mlp import __all__ as _a_mlp
from ._encoders import *  # noqa: F401,F403
from ._encoders import __all__ as _a_enc

__all__ = [*_a_base, *_a_voxel, *_a_mlp, *_a_enc]
from ._multibody import *  # noqa: F401,F403
from ._multibody import __all__ as _a_multibody

__all__ += [*_a_multibody]
from ._linear import *  # noqa: F401,F403,E402
from ._linear import __all__ as _a_linear  # noqa: E402

__all__ += [*_a_linear]
