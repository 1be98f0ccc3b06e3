"""jaxhet.sim: simulated datasets with ground truth (bundled AdK structures and transition path)."""

from ._structures import *  # noqa: F401,F403
from ._structures import __all__ as _a1
from ._simulate import *  # noqa: F401,F403
from ._simulate import __all__ as _a2

from ._write import *  # noqa: F401,F403
from ._write import __all__ as _a3

__all__ = [*_a1, *_a2, *_a3]
