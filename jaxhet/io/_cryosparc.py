"""cryoSPARC ``.cs`` particle files (numpy structured arrays, ``np.load``).

Fields used (per particle):

* ``blob/path`` (bytes; a leading ``>`` is dropped), ``blob/idx`` (0-based),
  ``blob/shape`` (ny, nx), ``blob/psize_A`` (A);
* ``ctf/df1_A``, ``ctf/df2_A`` (= RELION rlnDefocusU/V), ``ctf/df_angle_rad``,
  ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``, ``ctf/phase_shift_rad``,
  ``ctf/bfactor`` (optional);
* ``alignments3D/pose`` (rotation vector, radians) and ``alignments3D/shift`` (pixels).

Pose convention (established from cryoDRGN 4.3.1 and cross-checked with pyem)::

    Rodrigues(alignments3D/pose) = A^T           (A = RELION Euler_angles2matrix)
    alignments3D/shift           = RELION origin in pixels (same sign)

cryoDRGN's ``parse_pose_csparc`` writes ``rot = expmap(pose)^T`` and ``trans = shift / D``
while its ``parse_pose_star`` writes ``rot = R_from_relion(euler) = A`` and
``trans = origin_px / D``; pyem's ``csparc2star`` writes
``euler = rot2euler(expmap(pose))`` with its ``expmap`` returning the transposed
Rodrigues matrix, and copies the shift to rlnOriginX/Y. Both say the same. The test
fixtures (``tests/data``) hold pkls that cryoDRGN itself wrote from a .cs and a STAR file
describing the same poses; ``tests/test_io_cryodrgn.py`` checks jaxhet against them.
"""

from __future__ import annotations

import os

import numpy as np

from jaxhet._errors import JaxhetInputError
from jaxhet.io._geometry import (axis_angle_to_matrix_np, euler_to_matrix_np,
                                 matrix_to_axis_angle_np, matrix_to_euler_np)
from jaxhet.io._mrc import stack_box_sizes
from jaxhet.io._paths import names_still_valid, relative_name, resolve_stack_names
from jaxhet.io._table import ParticleTable, snapshot

__all__ = ["read_cs", "write_cs", "cs_pose_to_relion", "relion_to_cs_pose"]

_CTF_REQUIRED = ["ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm",
                 "ctf/amp_contrast"]


def cs_pose_to_relion(pose, shift) -> tuple[np.ndarray, np.ndarray]:
    """cryoSPARC (rotation vector [N,3], shift [N,2] px) -> RELION (euler deg [N,3], origin px [N,2])."""
    A = np.swapaxes(axis_angle_to_matrix_np(pose), -1, -2)
    return matrix_to_euler_np(A), np.asarray(shift, np.float64)


def relion_to_cs_pose(euler_in_degrees, origin_in_pixels) -> tuple[np.ndarray, np.ndarray]:
    """RELION (euler deg [N,3], origin px [N,2]) -> cryoSPARC (rotation vector [N,3], shift [N,2] px)."""
    A = euler_to_matrix_np(euler_in_degrees)
    return matrix_to_axis_angle_np(np.swapaxes(A, -1, -2)), np.asarray(origin_in_pixels, np.float64)


def _decode(paths) -> np.ndarray:
    out = np.empty(len(paths), dtype=object)
    for i, p in enumerate(paths):
        s = p.decode("utf-8") if isinstance(p, (bytes, np.bytes_)) else str(p)
        out[i] = s[1:] if s.startswith(">") else s
    return out


def _load(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise JaxhetInputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            arr = np.load(f, allow_pickle=False)
    except Exception as e:
        raise JaxhetInputError(f"{path}: not a cryoSPARC .cs file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None:
        raise JaxhetInputError(f"{path}: not a cryoSPARC .cs file (no structured array)")
    return arr


def read_cs(path, datadir: str | None = None) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file into a ParticleTable.

    Args:
        path: the .cs file.
        datadir: folder holding the stacks (default: the .cs folder, then its parents).

    Returns:
        ParticleTable (RELION conventions; see the module docstring); ``source`` holds
        the structured array, so :func:`write_cs` writes the file back exactly.

    Raises:
        JaxhetInputError: missing/unreadable file or missing fields (named).
    """
    path = os.fspath(path)
    cs = _load(path)
    names = set(cs.dtype.names)
    missing = [f for f in ["blob/path", "blob/idx", "blob/psize_A"] + _CTF_REQUIRED if f not in names]
    if "alignments3D/pose" in names and "alignments3D/shift" not in names:
        missing.append("alignments3D/shift")
    if missing:
        what = "field" if len(missing) == 1 else "fields"
        raise JaxhetInputError(f"{path}: missing {what} {', '.join(missing)}")
    n = len(cs)
    stack_paths = resolve_stack_names(_decode(cs["blob/path"]), path, datadir)
    if "blob/shape" in names:
        box = np.asarray(cs["blob/shape"]).reshape(n, -1)[:, -1].astype(np.int64)
    else:
        sizes = stack_box_sizes(np.unique(stack_paths.astype(str)))
        box = np.array([sizes.get(p, 0) for p in stack_paths], np.int64)
    has_poses = "alignments3D/pose" in names
    if has_poses:
        euler, origin = cs_pose_to_relion(np.asarray(cs["alignments3D/pose"], np.float64),
                                          np.asarray(cs["alignments3D/shift"], np.float64))
    else:
        euler, origin = np.full((n, 3), np.nan), np.zeros((n, 2))
    f64 = lambda k: np.asarray(cs[k], np.float64)  # noqa: E731
    phase = np.rad2deg(f64("ctf/phase_shift_rad")) if "ctf/phase_shift_rad" in names else np.zeros(n)
    bfac = f64("ctf/bfactor") if "ctf/bfactor" in names else np.zeros(n)
    group = (np.asarray(cs["ctf/exp_group_id"], np.int64) + 1 if "ctf/exp_group_id" in names
             else np.ones(n, np.int64))
    table = ParticleTable(
        stack_paths=stack_paths, stack_indices=np.asarray(cs["blob/idx"], np.int64),
        euler_in_degrees=euler, origin_in_pixels=origin,
        defocus_u_in_angstroms=f64("ctf/df1_A"), defocus_v_in_angstroms=f64("ctf/df2_A"),
        defocus_angle_in_degrees=np.rad2deg(f64("ctf/df_angle_rad")),
        phase_shift_in_degrees=phase, b_factor_in_angstroms2=bfac, optics_group=group,
        voltage_in_kilovolts=f64("ctf/accel_kv"), spherical_aberration_in_mm=f64("ctf/cs_mm"),
        amplitude_contrast=f64("ctf/amp_contrast"), pixel_size_in_angstroms=f64("blob/psize_A"),
        box_size=box, has_poses=has_poses, has_ctf=True, filename=path, source_rows=np.arange(n))
    table.source = {"format": "cs", "array": cs,
                    "dir": os.path.realpath(os.path.dirname(os.path.abspath(path))),
                    "read_values": snapshot(table)}
    return table


def _fresh_dtype(n_path: int, has_poses: bool):
    fields = [("uid", "<u8"), ("blob/path", f"S{max(n_path, 1)}"), ("blob/idx", "<u4"),
              ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"),
              ("ctf/type", "S9"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"),
              ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
              ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
              ("ctf/bfactor", "<f4")]
    if has_poses:
        fields += [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                   ("alignments3D/psize_A", "<f4")]
    return np.dtype(fields)


def cs_array(table: ParticleTable, path: str = "particles.cs") -> np.ndarray:
    """The structured array :func:`write_cs` would save."""
    out_dir = os.path.dirname(os.path.abspath(path))
    src = table.source
    n = len(table)
    if isinstance(src, dict) and src.get("format") == "cs" and table.source_rows is not None:
        arr = src["array"][table.source_rows].copy()
        ch = table.changed
        poses_changed = ch("euler_in_degrees") | ch("origin_in_pixels")
        if table.has_poses and "alignments3D/pose" in arr.dtype.names and poses_changed.any():
            pose, shift = relion_to_cs_pose(table.euler_in_degrees, table.origin_in_pixels)
            m = ch("euler_in_degrees")
            arr["alignments3D/pose"][m] = pose[m]
            m = ch("origin_in_pixels")
            arr["alignments3D/shift"][m] = shift[m]
        conv = {"defocus_u_in_angstroms": ("ctf/df1_A", 1.0), "defocus_v_in_angstroms": ("ctf/df2_A", 1.0),
                "defocus_angle_in_degrees": ("ctf/df_angle_rad", np.pi / 180),
                "phase_shift_in_degrees": ("ctf/phase_shift_rad", np.pi / 180),
                "b_factor_in_angstroms2": ("ctf/bfactor", 1.0),
                "voltage_in_kilovolts": ("ctf/accel_kv", 1.0), "spherical_aberration_in_mm": ("ctf/cs_mm", 1.0),
                "amplitude_contrast": ("ctf/amp_contrast", 1.0), "pixel_size_in_angstroms": ("blob/psize_A", 1.0)}
        for name, (field, scale) in conv.items():
            m = ch(name)
            if m.any():
                if field not in arr.dtype.names:
                    raise JaxhetInputError(f"{path}: cannot store changed {name}: the .cs has no field {field}")
                arr[field][m] = getattr(table, name)[m] * scale
        m = ch("box_size")
        if m.any() and "blob/shape" in arr.dtype.names:
            arr["blob/shape"][m] = table.box_size[m, None]
        m = ch("stack_paths") | ch("stack_indices")
        if os.path.realpath(out_dir) != src["dir"]:
            # keep a name only if it still resolves to the same file from the new folder
            m = m | ~names_still_valid(_decode(arr["blob/path"]), table.stack_paths, out_dir)
        if m.any():
            new = np.array([relative_name(p, out_dir).encode() for p in table.stack_paths], dtype=object)
            width = max(arr.dtype["blob/path"].itemsize if arr.dtype["blob/path"].kind == "S" else 0,
                        max(len(b) for b in new))
            if arr.dtype["blob/path"].kind == "S" and width > arr.dtype["blob/path"].itemsize:
                dt = [(nm, (f"S{width}" if nm == "blob/path" else arr.dtype[nm])) for nm in arr.dtype.names]
                wider = np.zeros(n, dtype=dt)
                for nm in arr.dtype.names:
                    wider[nm] = arr[nm]
                arr = wider
            arr["blob/path"][m] = new[m]
            arr["blob/idx"][m] = table.stack_indices[m]
        return arr
    if not table.has_ctf:
        raise JaxhetInputError(f"{path}: the particles have no CTF parameters")
    names = [relative_name(p, out_dir).encode() for p in table.stack_paths]
    arr = np.zeros(n, dtype=_fresh_dtype(max((len(b) for b in names), default=1), table.has_poses))
    arr["uid"] = np.arange(n, dtype=np.uint64)
    arr["blob/path"] = names
    arr["blob/idx"] = table.stack_indices
    arr["blob/shape"] = table.box_size[:, None]
    arr["blob/psize_A"] = table.pixel_size_in_angstroms
    arr["ctf/type"] = b"imagectf"
    arr["ctf/exp_group_id"] = np.maximum(table.optics_group - 1, 0)
    arr["ctf/accel_kv"] = table.voltage_in_kilovolts
    arr["ctf/cs_mm"] = table.spherical_aberration_in_mm
    arr["ctf/amp_contrast"] = table.amplitude_contrast
    arr["ctf/df1_A"] = table.defocus_u_in_angstroms
    arr["ctf/df2_A"] = table.defocus_v_in_angstroms
    arr["ctf/df_angle_rad"] = np.deg2rad(table.defocus_angle_in_degrees)
    arr["ctf/phase_shift_rad"] = np.deg2rad(table.phase_shift_in_degrees)
    arr["ctf/bfactor"] = table.b_factor_in_angstroms2
    if table.has_poses:
        pose, shift = relion_to_cs_pose(table.euler_in_degrees, table.origin_in_pixels)
        arr["alignments3D/pose"] = pose
        arr["alignments3D/shift"] = shift
        arr["alignments3D/psize_A"] = table.pixel_size_in_angstroms
    return arr


def write_cs(path, table: ParticleTable, overwrite: bool = False) -> None:
    """Write a ParticleTable as a cryoSPARC ``.cs`` file (``np.save`` into the open file).

    A table read by :func:`read_cs` keeps every field of the original rows; changed
    poses, CTF and image locations are updated. Other tables get the fields listed in
    the module docstring (float32, as cryoSPARC).

    Args:
        path: output file (the ``.cs`` extension is kept as given).
        table: the particles.
        overwrite: replace an existing file.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise JaxhetInputError(f"{path}: file exists (pass overwrite=True to replace it)")
    arr = cs_array(table, path)
    with open(path, "wb") as f:
        np.save(f, arr)
