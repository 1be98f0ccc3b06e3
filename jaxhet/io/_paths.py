"""Resolving image-stack names found in metadata files."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

__all__ = ["resolve_stack_names", "relative_name"]


def _resolve_one(name: str, base: str, datadir: str | None) -> str:
    if os.path.isabs(name):
        return os.path.normpath(name)
    if datadir is not None:
        cands = [os.path.join(datadir, name), os.path.join(datadir, os.path.basename(name))]
    else:
        # the metadata file's folder first; then its parents, since RELION and cryoSPARC
        # write names relative to the project folder (e.g. Extract/job012/Movies/x.mrcs
        # inside Extract/job012/particles.star)
        cands = [os.path.join(base, name)]
        d = os.path.abspath(base or ".")
        for _ in range(3):
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
            c = os.path.join(d, name)
            cands.append(c if os.path.isabs(base) else os.path.relpath(c))
    for c in cands:
        if os.path.isfile(c):
            return os.path.normpath(c)
    return os.path.normpath(cands[0])


def resolve_stack_names(names, metadata_path: str, datadir: str | None = None) -> np.ndarray:
    """Turn stack names from a metadata file into usable file names.

    A relative name is joined to ``datadir`` when given (its base name too), else to the
    metadata file's folder; if no such file exists there, the folder's parents are tried
    (project-relative names), and the first existing file wins. Names that match no
    file keep the metadata-folder form (reading them raises a clear error later).

    Args:
        names: [N] stack names as written in the file.
        metadata_path: the metadata file.
        datadir: optional folder holding the stacks.

    Returns:
        [N] object array of file names (each distinct name resolved once).
    """
    base = os.path.dirname(os.fspath(metadata_path))
    codes, uniques = pd.factorize(pd.Series(np.asarray(names, dtype=object)), sort=False)
    resolved = np.empty(len(uniques), dtype=object)
    for i, u in enumerate(uniques):
        resolved[i] = _resolve_one(str(u), base, datadir)
    return resolved[codes]


def names_still_valid(names, paths, out_dir: str) -> np.ndarray:
    """[N] bool: whether each stack name, read from a file in ``out_dir``, would resolve to
    ``paths`` (so it can be written unchanged)."""
    names = np.asarray(names, dtype=object)
    paths = np.asarray(paths, dtype=object)
    key = pd.Series([f"{n}\x00{p}" for n, p in zip(names, paths)])
    codes, uniques = pd.factorize(key, sort=False)
    ok = np.empty(len(uniques), bool)
    for i, u in enumerate(uniques):
        n, p = u.split("\x00", 1)
        ok[i] = os.path.abspath(_resolve_one(n, out_dir, None)) == os.path.abspath(p)
    return ok[codes] if len(names) else np.zeros(0, bool)


def relative_name(path: str, out_dir: str) -> str:
    """``path`` written relative to ``out_dir`` (absolute paths elsewhere stay absolute)."""
    ap = os.path.abspath(path)
    try:
        rel = os.path.relpath(ap, os.path.abspath(out_dir or "."))
    except ValueError:
        return ap
    return rel
