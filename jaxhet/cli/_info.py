"""``jaxhet info FILE``: summarise an image stack, map, STAR, cryoSPARC .cs or cryoDRGN pkl."""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np

from jaxhet._errors import JaxhetInputError


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``info`` command to the ``jaxhet`` parser."""
    p = subparsers.add_parser(
        "info", help="summarise a particle stack, map, STAR, .cs or cryoDRGN .pkl file",
        description="Print a summary of FILE: an MRC map or MRCS stack, a RELION STAR file, "
                    "a cryoSPARC .cs file or a cryoDRGN poses/ctf .pkl.")
    p.add_argument("file", help="the file to summarise")
    p.add_argument("--n-images", type=int, default=100, metavar="N",
                   help="images of a stack used for the mean/std (default 100)")
    p.set_defaults(func=run)
    return p


def _rng(a) -> str:
    a = np.asarray(a, np.float64)
    if a.size == 0:
        return "-"
    lo, hi = float(np.min(a)), float(np.max(a))
    return f"{lo:g}" if lo == hi else f"{lo:g} .. {hi:g}"


def _uniq(a) -> str:
    vals = np.unique(np.asarray(a))
    s = ", ".join(f"{v:g}" for v in vals[:6])
    return s + (", ..." if vals.size > 6 else "")


def _out(lines) -> None:
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k + ':':<{width + 1}} {v}")


def _info_mrc(path: str, n_images: int) -> None:
    from jaxhet.io import open_stack, read_mrc_header
    h = read_mrc_header(path)
    nz, ny, nx = h["shape"]
    dtype = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}.get(h["mode"], f"mode {h['mode']}")
    is_stack = h["is_stack"] or path.lower().endswith(".mrcs") or nz == 1
    with open_stack(path, check_finite=False) as st:
        k = max(1, min(n_images, nz)) if is_stack else nz
        sample = st[np.arange(k)]
    finite = np.isfinite(sample).all()
    if is_stack:
        lines = [("file", path), ("kind", "image stack"), ("images", nz), ("box", f"{ny} x {nx} px"),
                 ("pixel size", f"{h['voxel_size']:g} A"), ("dtype", f"{dtype} (mode {h['mode']})"),
                 (f"mean / std (first {k})", f"{sample.mean():.6g} / {sample.std():.6g}" if finite
                  else "NaN or inf pixels present")]
    else:
        lines = [("file", path), ("kind", "3D map"), ("shape (z, y, x)", f"{nz} x {ny} x {nx}"),
                 ("voxel size", f"{h['voxel_size']:g} A"), ("dtype", f"{dtype} (mode {h['mode']})"),
                 ("min / max", f"{sample.min():.6g} / {sample.max():.6g}"),
                 ("mean / std", f"{sample.mean():.6g} / {sample.std():.6g}" if finite
                  else "NaN or inf voxels present")]
    _out(lines)


def _table_lines(t) -> list:
    lines = [("particles", len(t))]
    groups = np.unique(t.optics_group)
    lines.append(("optics groups", len(groups)))
    for g in groups[:8]:
        m = t.optics_group == g
        lines.append((f"  group {g}", f"{int(m.sum())} particles, {_uniq(t.voltage_in_kilovolts[m])} kV, "
                      f"Cs {_uniq(t.spherical_aberration_in_mm[m])} mm, w {_uniq(t.amplitude_contrast[m])}, "
                      f"{_uniq(t.pixel_size_in_angstroms[m])} A/px, box {_uniq(t.box_size[m])}"))
    lines.append(("pixel size", f"{_uniq(t.pixel_size_in_angstroms)} A"))
    box = t.box_size
    lines.append(("box", f"{_uniq(box)} px" if (box > 0).all() else "unknown (stack files not found)"))
    if t.has_ctf:
        lines.append(("defocus U", f"{_rng(t.defocus_u_in_angstroms)} A"))
        lines.append(("defocus V", f"{_rng(t.defocus_v_in_angstroms)} A"))
        lines.append(("phase shift", f"{_rng(t.phase_shift_in_degrees)} deg"))
    else:
        lines.append(("ctf", "absent"))
    if t.has_poses:
        lines.append(("poses", "present"))
        lines.append(("tilt", f"{_rng(t.euler_in_degrees[:, 1])} deg"))
        lines.append(("origin x / y", f"{_rng(t.origin_in_pixels[:, 0])} / {_rng(t.origin_in_pixels[:, 1])} px"))
    else:
        lines.append(("poses", "absent"))
    files = np.unique(t.stack_paths.astype(str))
    exist = sum(os.path.isfile(f) for f in files[:1000])
    note = "" if len(files) <= 1000 else " (first 1000 checked)"
    lines.append(("image stacks", f"{len(files)} files, {exist} found{note}"))
    return lines


def _info_star(path: str) -> None:
    from jaxhet.io import read_star
    t = read_star(path)
    src = t.source
    version = {"3.0": "RELION 3.0", "3.1": "RELION 3.1+", "5.0": "RELION 5"}[src["version"]]
    blocks = ", ".join(f"data_{k}" for k in src["blocks"])
    _out([("file", path), ("kind", f"STAR, {version}"), ("blocks", blocks)] + _table_lines(t))


def _info_cs(path: str) -> None:
    from jaxhet.io import read_cs
    t = read_cs(path)
    n_fields = len(t.source["array"].dtype.names)
    _out([("file", path), ("kind", "cryoSPARC .cs"), ("fields", n_fields)] + _table_lines(t))


def _info_pkl(path: str) -> None:
    if not os.path.isfile(path):
        raise JaxhetInputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except Exception as e:
        raise JaxhetInputError(f"{path}: not a pickle file ({type(e).__name__})") from None
    from jaxhet.io import read_ctf_pkl, read_poses_pkl
    arr = np.asarray(obj) if isinstance(obj, np.ndarray) else None
    if arr is not None and arr.ndim == 2 and arr.shape[1] == 9:
        c = read_ctf_pkl(path)
        _out([("file", path), ("kind", "cryoDRGN ctf pkl"), ("particles", len(c)),
              ("box", f"{_uniq(c[:, 0])} px"), ("pixel size", f"{_uniq(c[:, 1])} A"),
              ("defocus U", f"{_rng(c[:, 2])} A"), ("defocus V", f"{_rng(c[:, 3])} A"),
              ("defocus angle", f"{_rng(c[:, 4])} deg"), ("voltage", f"{_uniq(c[:, 5])} kV"),
              ("Cs", f"{_uniq(c[:, 6])} mm"), ("amplitude contrast", _uniq(c[:, 7])),
              ("phase shift", f"{_rng(c[:, 8])} deg")])
        return
    if isinstance(obj, (tuple, list)) or (arr is not None and arr.ndim == 3):
        rot, trans = read_poses_pkl(path)
        err = np.abs(np.einsum("nij,nkj->nik", rot, rot) - np.eye(3)).max() if len(rot) else 0.0
        det = np.linalg.det(rot.astype(np.float64)) if len(rot) else np.zeros(0)
        _out([("file", path), ("kind", "cryoDRGN poses pkl"), ("particles", len(rot)),
              ("rotations", f"max |R R^T - I| = {err:.2e}, det {_rng(np.round(det, 4))}"),
              ("trans x (fraction of box)", _rng(trans[:, 0])),
              ("trans y (fraction of box)", _rng(trans[:, 1]))])
        return
    raise JaxhetInputError(f"{path}: not a cryoDRGN poses or ctf pkl")


def run(args) -> int:
    """Print the summary of ``args.file``."""
    path = args.file
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise JaxhetInputError(f"{path}: no such file")
    if ext in (".mrc", ".mrcs", ".map", ".st"):
        _info_mrc(path, args.n_images)
    elif ext == ".star":
        _info_star(path)
    elif ext == ".cs":
        _info_cs(path)
    elif ext == ".pkl":
        _info_pkl(path)
    else:
        raise JaxhetInputError(
            f"{path}: unknown file type {ext or '(no extension)'!r} (expected .mrc, .mrcs, .star, .cs or .pkl)")
    return 0
