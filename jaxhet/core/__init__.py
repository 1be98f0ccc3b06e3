"""jaxhet.core: the pure-functional, differentiable image-formation core.

Plain functions of arrays (float32 / complex64), jit/vmap/grad-clean; no Flax, no I/O.
"""

from ._rotations import *  # noqa: F401,F403
from ._rotations import __all__ as _a1
from ._fourier import *  # noqa: F401,F403
from ._fourier import __all__ as _a2
from ._slicing import *  # noqa: F401,F403
from ._slicing import __all__ as _a3
from ._ctf import *  # noqa: F401,F403
from ._ctf import __all__ as _a4
from ._shifts import *  # noqa: F401,F403
from ._shifts import __all__ as _a5
from ._atoms import *  # noqa: F401,F403
from ._atoms import __all__ as _a6
from ._noise import *  # noqa: F401,F403
from ._noise import __all__ as _a7
from ._forward import *  # noqa: F401,F403
from ._forward import __all__ as _a8

__all__ = [*_a1, *_a2, *_a3, *_a4, *_a5, *_a6, *_a7, *_a8]
