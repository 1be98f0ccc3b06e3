"""Errors that the command line turns into one clear line (no traceback)."""


class JaxhetInputError(ValueError):
    """Bad user input: a missing or malformed file, inconsistent metadata, bad values.

    The message names the file and the problem, e.g.
    ``particles.star: missing column rlnDefocusU``.
    """
