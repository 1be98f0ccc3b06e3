"""One entry point for particle data: STAR, .cs, or an image stack plus cryoDRGN pkls."""

from __future__ import annotations

import os

import numpy as np

from jaxhet._errors import JaxhetInputError
from jaxhet.io._cryodrgn import (apply_cryodrgn_ctf, apply_cryodrgn_poses, read_ctf_pkl,
                                 read_poses_pkl)
from jaxhet.io._cryosparc import read_cs
from jaxhet.io._mrc import read_mrc_header
from jaxhet.io._paths import resolve_stack_names
from jaxhet.io._star import read_star
from jaxhet.io._table import ParticleTable

__all__ = ["read_particles", "STACK_EXTENSIONS"]

STACK_EXTENSIONS = (".mrcs", ".mrc", ".st")


def _stack_table(path: str, datadir=None) -> ParticleTable:
    if path.lower().endswith(".txt"):  # cryoDRGN-style list of stacks, one per line
        if not os.path.isfile(path):
            raise JaxhetInputError(f"{path}: no such file")
        with open(path) as f:
            names = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        if not names:
            raise JaxhetInputError(f"{path}: lists no image stacks")
        files = resolve_stack_names(names, path, datadir)
    else:
        files = [path]
    parts = []
    for fn in files:
        h = read_mrc_header(fn)
        nz, ny, nx = h["shape"]
        if ny != nx:
            raise JaxhetInputError(f"{fn}: images are {ny}x{nx}; only square images are supported")
        parts.append(ParticleTable.create(fn, np.arange(nz), pixel_size_in_angstroms=h["voxel_size"],
                                          box_size=nx, filename=path))
    table = parts[0] if len(parts) == 1 else _concat(parts, path)
    # no CTF yet: mark the optics fields unknown
    table.has_ctf = False
    table.voltage_in_kilovolts[:] = np.nan
    table.spherical_aberration_in_mm[:] = np.nan
    table.amplitude_contrast[:] = np.nan
    return table


def _concat(parts, filename) -> ParticleTable:
    from jaxhet.io._table import ARRAY_FIELDS
    kw = {name: np.concatenate([getattr(p, name) for p in parts]) for name in ARRAY_FIELDS}
    return ParticleTable(**kw, has_poses=False, has_ctf=True, filename=filename)


def read_particles(path, poses=None, ctf=None, datadir: str | None = None) -> ParticleTable:
    """Read particle metadata from any supported format.

    Args:
        path: ``.star`` (RELION), ``.cs`` (cryoSPARC), or an image stack ``.mrcs`` /
            ``.mrc`` (or a ``.txt`` list of stacks, one per line) whose images are
            particles 0..N-1.
        poses: optional cryoDRGN poses pkl; replaces the file's poses.
        ctf: optional cryoDRGN ctf pkl; replaces the file's CTF (and gives a stack its
            pixel size and optics).
        datadir: folder holding the stacks named in a STAR/.cs file.

    Returns:
        ParticleTable.

    Raises:
        JaxhetInputError: unknown format, missing files, or pkls that do not match the
            particles (count or box size).
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".star":
        table = read_star(path, datadir=datadir)
    elif ext == ".cs":
        table = read_cs(path, datadir=datadir)
    elif ext in STACK_EXTENSIONS or ext == ".txt":
        table = _stack_table(path, datadir)
    elif ext == ".pkl":
        raise JaxhetInputError(
            f"{path}: a .pkl holds only poses or CTF; give the image stack, STAR or .cs file "
            "and pass the pkl as poses= / ctf=")
    else:
        raise JaxhetInputError(
            f"{path}: unknown particle file format {ext or '(no extension)'!r} "
            "(expected .star, .cs, .mrcs, .mrc or .txt)")
    if ctf is not None:
        ctf = os.fspath(ctf)
        arr = read_ctf_pkl(ctf)
        if len(arr) != len(table):
            raise JaxhetInputError(f"{ctf}: {len(arr)} CTF rows for {len(table)} particles in {path}")
        known = table.box_size > 0
        if known.any() and np.any(np.rint(arr[known, 0]).astype(np.int64) != table.box_size[known]):
            i = int(np.nonzero(np.rint(arr[known, 0]).astype(np.int64) != table.box_size[known])[0][0])
            raise JaxhetInputError(
                f"{ctf}: box size {int(arr[known][i, 0])} disagrees with {int(table.box_size[known][i])} in {path}")
        table = apply_cryodrgn_ctf(table, arr, ctf)
    if poses is not None:
        poses = os.fspath(poses)
        rot, trans = read_poses_pkl(poses)
        if len(rot) != len(table):
            raise JaxhetInputError(f"{poses}: {len(rot)} poses for {len(table)} particles in {path}")
        table = apply_cryodrgn_poses(table, rot, trans, poses)
    return table

