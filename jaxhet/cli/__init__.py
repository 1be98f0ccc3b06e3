"""The ``jaxhet`` command line (thin wrappers over the library)."""
