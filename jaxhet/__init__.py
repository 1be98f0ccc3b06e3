"""jaxhet: continuous conformational heterogeneity in cryo-EM, in JAX."""

__version__ = "0.1.0"

from jaxhet._errors import JaxhetInputError  # noqa: F401
