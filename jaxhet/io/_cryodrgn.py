"""cryoDRGN pose and CTF pickles, and conversions to and from ParticleTable.

Formats (as written by cryoDRGN 4.3.1 ``parse_pose_star`` / ``parse_ctf_star`` /
``parse_pose_csparc`` / ``parse_ctf_csparc``):

* poses ``.pkl``: a tuple ``(rot [N, 3, 3], trans [N, 2])``.
  ``rot = R_from_relion(rot, tilt, psi)``, which equals RELION's matrix ``A``
  (Euler_angles2matrix, rows as in CONVENTIONS.md) exactly: no transpose, no flips.
  ``trans = origin_in_pixels / D``: RELION's origin (same sign) as a fraction of the
  box D. cryoDRGN writes float64 from STAR files; jaxhet writes float32.
* ctf ``.pkl``: float32 ``[N, 9]``: D, Apix, DefocusU (A), DefocusV (A), DefocusAngle
  (deg), Voltage (kV), Cs (mm), amplitude contrast, phase shift (deg).

Tests (``tests/test_io_cryodrgn.py``) compare these converters with pkls that cryoDRGN
itself wrote for the fixtures in ``tests/data``.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from jaxhet._errors import JaxhetInputError
from jaxhet.io._geometry import euler_to_matrix_np, matrix_to_euler_np
from jaxhet.io._table import ParticleTable

__all__ = ["read_poses_pkl", "write_poses_pkl", "read_ctf_pkl", "write_ctf_pkl",
           "table_to_cryodrgn_poses", "table_to_cryodrgn_ctf", "table_from_cryodrgn",
           "apply_cryodrgn_poses", "apply_cryodrgn_ctf"]


def _load_pickle(path) -> object:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise JaxhetInputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:
        raise JaxhetInputError(f"{path}: not a pickle file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _dump(path, obj, overwrite: bool) -> None:
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise JaxhetInputError(f"{path}: file exists (pass overwrite=True to replace it)")
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def read_poses_pkl(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a cryoDRGN poses pkl.

    Args:
        path: ``(rot [N,3,3], trans [N,2])`` pickle (a bare ``rot`` array is accepted,
            with zero translations).

    Returns:
        ``(rot float32 [N,3,3], trans float32 [N,2])``, trans as a fraction of the box.
    """
    path = os.fspath(path)
    obj = _load_pickle(path)
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
        rot = np.asarray(obj[0])
        trans = np.asarray(obj[1]) if len(obj) == 2 else None
    elif isinstance(obj, np.ndarray):
        rot, trans = obj, None
    else:
        raise JaxhetInputError(f"{path}: not a cryoDRGN poses pkl (expected a tuple (rot, trans))")
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise JaxhetInputError(f"{path}: rotations have shape {rot.shape}, expected [N, 3, 3]")
    if trans is None:
        trans = np.zeros((rot.shape[0], 2))
    if trans.shape != (rot.shape[0], 2):
        raise JaxhetInputError(f"{path}: translations have shape {trans.shape}, expected [{rot.shape[0]}, 2]")
    rot = rot.astype(np.float32)
    trans = trans.astype(np.float32)
    if not (np.isfinite(rot).all() and np.isfinite(trans).all()):
        raise JaxhetInputError(f"{path}: poses hold NaN or infinite values")
    return rot, trans


def write_poses_pkl(path, rot, trans, overwrite: bool = False) -> None:
    """Write ``(rot [N,3,3], trans [N,2])`` as float32 to a cryoDRGN poses pkl."""
    rot = np.asarray(rot, np.float32)
    trans = np.asarray(trans, np.float32)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3) or trans.shape != (rot.shape[0], 2):
        raise JaxhetInputError(f"{os.fspath(path)}: poses must be rot [N,3,3] and trans [N,2], got {rot.shape}, {trans.shape}")
    _dump(path, (rot, trans), overwrite)


def read_ctf_pkl(path) -> np.ndarray:
    """Read a cryoDRGN ctf pkl: float32 [N, 9] (D, Apix, dfU, dfV, dfAngle, kV, Cs, w, phase)."""
    path = os.fspath(path)
    obj = _load_pickle(path)
    arr = np.asarray(obj)
    if arr.ndim != 2 or arr.shape[1] != 9 or arr.dtype.kind not in "fiu":
        raise JaxhetInputError(f"{path}: not a cryoDRGN ctf pkl (expected a float array [N, 9], got {arr.shape})")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise JaxhetInputError(f"{path}: CTF parameters hold NaN or infinite values")
    return arr


def write_ctf_pkl(path, ctf, overwrite: bool = False) -> None:
    """Write a float32 [N, 9] cryoDRGN ctf pkl."""
    arr = np.asarray(ctf, np.float32)
    if arr.ndim != 2 or arr.shape[1] != 9:
        raise JaxhetInputError(f"{os.fspath(path)}: ctf parameters must be [N, 9], got {arr.shape}")
    _dump(path, arr, overwrite)


def table_to_cryodrgn_poses(table: ParticleTable) -> tuple[np.ndarray, np.ndarray]:
    """ParticleTable -> cryoDRGN ``(rot [N,3,3], trans [N,2])`` float32, as parse_pose_star.

    ``rot`` = RELION A; ``trans`` = origin_in_pixels / box_size.
    """
    if not table.has_poses:
        raise JaxhetInputError(f"{table.filename or 'particle table'}: the particles have no poses")
    if (table.box_size <= 0).any():
        raise JaxhetInputError(f"{table.filename or 'particle table'}: image size unknown; cannot express translations as a fraction of the box")
    rot = euler_to_matrix_np(table.euler_in_degrees).astype(np.float32)
    trans = (table.origin_in_pixels / table.box_size[:, None]).astype(np.float32)
    return rot, trans


def table_to_cryodrgn_ctf(table: ParticleTable) -> np.ndarray:
    """ParticleTable -> cryoDRGN ctf array float32 [N, 9], as parse_ctf_star."""
    if not table.has_ctf:
        raise JaxhetInputError(f"{table.filename or 'particle table'}: the particles have no CTF parameters")
    cols = [table.box_size, table.pixel_size_in_angstroms, table.defocus_u_in_angstroms,
            table.defocus_v_in_angstroms, table.defocus_angle_in_degrees, table.voltage_in_kilovolts,
            table.spherical_aberration_in_mm, table.amplitude_contrast, table.phase_shift_in_degrees]
    # cast each column as cryoDRGN does: float64 values -> float32 array
    return np.stack([np.asarray(c, np.float64) for c in cols], -1).astype(np.float32)


def apply_cryodrgn_poses(table: ParticleTable, rot, trans, name: str = "poses") -> ParticleTable:
    """A copy of ``table`` with poses from cryoDRGN arrays (trans scaled by the box)."""
    rot = np.asarray(rot, np.float64)
    trans = np.asarray(trans, np.float64)
    if rot.shape[0] != len(table):
        raise JaxhetInputError(f"{name}: {rot.shape[0]} poses for {len(table)} particles")
    if (table.box_size <= 0).any():
        raise JaxhetInputError(f"{name}: image size unknown; cannot convert translations to pixels")
    out = table.copy()
    out.euler_in_degrees = matrix_to_euler_np(rot)
    out.origin_in_pixels = trans * table.box_size[:, None]
    out.has_poses = True
    return out


def apply_cryodrgn_ctf(table: ParticleTable, ctf, name: str = "ctf") -> ParticleTable:
    """A copy of ``table`` with CTF, pixel size and box from a cryoDRGN [N, 9] array."""
    c = np.asarray(ctf, np.float64)
    if c.shape != (len(table), 9):
        raise JaxhetInputError(f"{name}: {c.shape[0]} CTF rows for {len(table)} particles")
    out = table.copy()
    out.box_size = np.rint(c[:, 0]).astype(np.int64)
    out.pixel_size_in_angstroms = c[:, 1]
    out.defocus_u_in_angstroms = c[:, 2]
    out.defocus_v_in_angstroms = c[:, 3]
    out.defocus_angle_in_degrees = c[:, 4]
    out.voltage_in_kilovolts = c[:, 5]
    out.spherical_aberration_in_mm = c[:, 6]
    out.amplitude_contrast = c[:, 7]
    out.phase_shift_in_degrees = c[:, 8]
    out.has_ctf = True
    return out


def table_from_cryodrgn(stack_path, n: int | None = None, box_size: int | None = None,
                        pixel_size_in_angstroms: float | None = None, rot=None, trans=None,
                        ctf=None, filename: str = "") -> ParticleTable:
    """Build a ParticleTable for one stack (images 0..N-1) from cryoDRGN arrays.

    Args:
        stack_path: the image stack.
        n: number of images (else taken from rot or ctf).
        box_size, pixel_size_in_angstroms: used when ``ctf`` is None (else from ctf).
        rot, trans: cryoDRGN poses (trans as a fraction of the box), or None.
        ctf: cryoDRGN [N, 9] CTF array, or None (then ``has_ctf=False``).

    Returns:
        ParticleTable with no ``source``.
    """
    if n is None:
        n = len(rot) if rot is not None else (len(ctf) if ctf is not None else None)
    if n is None:
        raise JaxhetInputError(f"{filename or stack_path}: number of particles unknown")
    table = ParticleTable.create(
        stack_path, np.arange(n), n=n,
        pixel_size_in_angstroms=np.nan if pixel_size_in_angstroms is None else pixel_size_in_angstroms,
        box_size=0 if box_size is None else box_size, filename=filename or str(stack_path))
    table.voltage_in_kilovolts[:] = np.nan
    table.spherical_aberration_in_mm[:] = np.nan
    table.amplitude_contrast[:] = np.nan
    if ctf is not None:
        table = apply_cryodrgn_ctf(table, ctf, filename or "ctf")
    if rot is not None:
        if trans is None:
            trans = np.zeros((n, 2))
        table = apply_cryodrgn_poses(table, rot, trans, filename or "poses")
    return table
