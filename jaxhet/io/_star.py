"""RELION STAR particle files (3.0, 3.1 and later, RELION 5), via the ``starfile`` package.

Layouts:

* **3.0**: one loop block; optics per particle (rlnVoltage, rlnSphericalAberration,
  rlnAmplitudeContrast); pixel size from rlnImagePixelSize or
  rlnDetectorPixelSize * 1e4 / rlnMagnification; origins rlnOriginX/Y in pixels.
* **3.1 and later** (RELION 4, 5): ``data_optics`` (one row per optics group) and
  ``data_particles``; origins rlnOriginXAngst/YAngst in Angstrom (divided by the
  particle's rlnImagePixelSize to get pixels). RELION 5 particle files have the same
  layout plus extra columns and blocks, which are kept.

rlnImageName is ``INDEX@FILE`` with a 1-based INDEX (the table stores it 0-based).
The origin keeps RELION's sign: the particle centre is at box centre minus origin.

Every value is read as text and only the columns jaxhet uses are converted to numbers,
so writing a file back (:func:`write_star`) reproduces every block, column and value;
only the values the table changed (pose, CTF, optics, image location, or a subset of
rows) are rewritten, as the shortest decimal that reads back as the same float64.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import starfile

from jaxhet._errors import JaxhetInputError
from jaxhet.io._mrc import stack_box_sizes
from jaxhet.io._paths import names_still_valid, relative_name, resolve_stack_names
from jaxhet.io._table import ParticleTable, snapshot

__all__ = ["read_star", "write_star"]

_REQUIRED_PARTICLE = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
_REQUIRED_OPTICS = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
_ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
_ORIGIN_A = ["rlnOriginXAngst", "rlnOriginYAngst"]
_ORIGIN_PX = ["rlnOriginX", "rlnOriginY"]
# columns that write_star manages itself when building a file anew
_MANAGED = set(["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift",
                "rlnCtfBfactor", "rlnOpticsGroup", "rlnOpticsGroupName", "rlnVoltage",
                "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                "rlnImageSize", "rlnDetectorPixelSize", "rlnMagnification",
                "rlnImageDimensionality"] + _ANGLES + _ORIGIN_A + _ORIGIN_PX)
_VERSION_LINE = re.compile(r"^#\s*version\s+(\d+)")


# ---------------------------------------------------------------------------- reading
def _scan(path: str) -> tuple[list[str], str | None]:
    """All column/key names in the file, and the '# version NNNNN' line if any."""
    names, version = set(), None
    with open(path, "r", errors="replace") as f:
        for line in f:
            if line.startswith("_"):
                names.add(line.split()[0][1:])
            elif version is None and line.startswith("#"):
                m = _VERSION_LINE.match(line.strip())
                if m:
                    version = m.group(1)
    return sorted(names), version


def _missing(path: str, cols: list[str]) -> JaxhetInputError:
    what = "column" if len(cols) == 1 else "columns"
    return JaxhetInputError(f"{path}: missing {what} {', '.join(cols)}")


def _numeric(path: str, df: pd.DataFrame, col: str, block: str) -> np.ndarray:
    s = df[col]
    vals = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(vals)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise JaxhetInputError(
            f"{path}: column {col} in data_{block} has a non-numeric value {str(s.iloc[i])!r} (row {i + 1})")
    return vals


class _Lookup:
    """Per-particle values of a label from data_optics (by optics group) or the particle table."""

    def __init__(self, path, P, O, pk, ok):
        self.path, self.P, self.O, self.pk, self.ok = path, P, O, pk, ok
        n = len(P)
        if O is not None and len(O) > 0:
            if "rlnOpticsGroup" in O:
                og = _numeric(path, O, "rlnOpticsGroup", ok).astype(np.int64)
            elif len(O) == 1:
                og = np.array([1])
            else:
                raise JaxhetInputError(f"{path}: missing column rlnOpticsGroup in data_{ok}")
            if "rlnOpticsGroup" in P:
                pg = _numeric(path, P, "rlnOpticsGroup", pk).astype(np.int64)
            elif len(O) == 1:
                pg = np.full(n, og[0])
            else:
                raise JaxhetInputError(f"{path}: missing column rlnOpticsGroup in data_{pk}")
            order = np.argsort(og, kind="stable")
            pos = np.searchsorted(og[order], pg)
            pos = np.clip(pos, 0, len(og) - 1)
            found = og[order][pos] == pg
            if not found.all():
                i = int(np.nonzero(~found)[0][0])
                raise JaxhetInputError(
                    f"{path}: optics group {pg[i]} of particle {i + 1} is not in data_{ok}")
            self.row = order[pos]
            self.groups = pg
        else:
            self.row = None
            self.groups = (_numeric(path, P, "rlnOpticsGroup", pk).astype(np.int64)
                           if "rlnOpticsGroup" in P else None)

    def get(self, label, particles_first=False):
        in_o = self.O is not None and label in self.O and self.row is not None
        in_p = label in self.P
        if particles_first and in_p:
            return _numeric(self.path, self.P, label, self.pk)
        if in_o:
            return _numeric(self.path, self.O, label, self.ok)[self.row]
        if in_p:
            return _numeric(self.path, self.P, label, self.pk)
        return None


def _split_image_names(path: str, s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    s = s.astype(str)
    part = s.str.partition("@")
    idx_txt = part[0].where(part[1] == "@", "1")
    names = part[2].where(part[1] == "@", part[0]).to_numpy(dtype=object)
    idx = pd.to_numeric(idx_txt, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(idx) | (idx < 1) | (idx != np.floor(idx)) | (np.char.str_len(names.astype(str)) == 0)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise JaxhetInputError(
            f"{path}: bad rlnImageName {s.iloc[i]!r} in row {i + 1} (expected INDEX@FILE, INDEX >= 1)")
    return names, idx.astype(np.int64) - 1


def _fields(path: str, blocks: dict, pk: str, ok: str | None, datadir) -> dict:
    P = blocks[pk]
    O = blocks[ok] if ok is not None else None
    n = len(P)
    missing = [c for c in _REQUIRED_PARTICLE if c not in P]
    look = _Lookup(path, P, O, pk, ok)
    missing += [c for c in _REQUIRED_OPTICS if not ((O is not None and c in O) or c in P)]
    has_ps = (O is not None and "rlnImagePixelSize" in O) or "rlnImagePixelSize" in P
    has_det = all((O is not None and c in O) or c in P for c in ("rlnDetectorPixelSize", "rlnMagnification"))
    if not has_ps and not has_det:
        missing.append("rlnImagePixelSize")
    angles = [c in P for c in _ANGLES]
    if (angles[0] or angles[1]) and not all(angles):
        missing += [c for c, a in zip(_ANGLES, angles) if not a]
    for pair in (_ORIGIN_A, _ORIGIN_PX):
        if (pair[0] in P) != (pair[1] in P):
            missing += [c for c in pair if c not in P]
    if missing:
        raise _missing(path, missing)

    names, stack_indices = _split_image_names(path, P["rlnImageName"])
    stack_paths = resolve_stack_names(names, path, datadir)

    if has_ps:
        pixel = look.get("rlnImagePixelSize")
    else:
        pixel = look.get("rlnDetectorPixelSize") * 1e4 / look.get("rlnMagnification")
    box = look.get("rlnImageSize")
    if box is None:
        sizes = stack_box_sizes(pd.unique(stack_paths))
        box = np.array([sizes.get(p, 0) for p in stack_paths], dtype=np.int64)
    voltage = look.get("rlnVoltage")
    cs = look.get("rlnSphericalAberration")
    w = look.get("rlnAmplitudeContrast")

    if all(angles):
        euler = np.stack([_numeric(path, P, c, pk) for c in _ANGLES], -1)
        has_poses = True
    else:
        euler = np.full((n, 3), np.nan)
        has_poses = False
    if _ORIGIN_A[0] in P:
        origin = np.stack([_numeric(path, P, c, pk) for c in _ORIGIN_A], -1) / pixel[:, None]
    elif _ORIGIN_PX[0] in P:
        origin = np.stack([_numeric(path, P, c, pk) for c in _ORIGIN_PX], -1)
    else:
        origin = np.zeros((n, 2))

    phase = look.get("rlnPhaseShift", particles_first=True)
    bfac = look.get("rlnCtfBfactor", particles_first=True)
    groups = look.groups
    if groups is None:  # RELION 3.0: one group per distinct set of optics values
        combos = np.stack([voltage, cs, w, pixel, np.asarray(box, np.float64)], -1)
        _, groups = np.unique(combos, axis=0, return_inverse=True)
        groups = groups.reshape(-1) + 1
    return dict(
        stack_paths=stack_paths, stack_indices=stack_indices, euler_in_degrees=euler,
        origin_in_pixels=origin,
        defocus_u_in_angstroms=_numeric(path, P, "rlnDefocusU", pk),
        defocus_v_in_angstroms=_numeric(path, P, "rlnDefocusV", pk),
        defocus_angle_in_degrees=_numeric(path, P, "rlnDefocusAngle", pk),
        phase_shift_in_degrees=np.zeros(n) if phase is None else phase,
        b_factor_in_angstroms2=np.zeros(n) if bfac is None else bfac,
        optics_group=groups, voltage_in_kilovolts=voltage, spherical_aberration_in_mm=cs,
        amplitude_contrast=w, pixel_size_in_angstroms=pixel, box_size=box,
        has_poses=has_poses, has_ctf=True)


def read_star(path, datadir: str | None = None) -> ParticleTable:
    """Read a RELION particle STAR file (3.0, 3.1+, RELION 5) into a ParticleTable.

    Args:
        path: the STAR file.
        datadir: folder holding the image stacks (default: the STAR file's folder, then
            its parents).

    Returns:
        ParticleTable; ``source`` holds the blocks (as text) to write the file back.

    Raises:
        JaxhetInputError: missing file, unparsable file, missing required column(s)
            (named), bad values, or particles whose optics group is not in data_optics.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise JaxhetInputError(f"{path}: no such file")
    try:
        names, version_line = _scan(path)
        blocks = starfile.read(path, always_dict=True, parse_as_string=names)
    except JaxhetInputError:
        raise
    except Exception as e:  # starfile/pandas raise many kinds
        raise JaxhetInputError(f"{path}: could not parse STAR file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(blocks, dict) or not blocks:
        raise JaxhetInputError(f"{path}: no data blocks found (not a STAR file?)")
    loops = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    ok = "optics" if "optics" in loops else None
    if "particles" in loops:
        pk = "particles"
    else:
        cands = [k for k, v in loops.items() if k != "optics" and "rlnImageName" in v]
        if not cands:
            raise _missing(path, ["rlnImageName"])
        pk = max(cands, key=lambda k: len(loops[k]))
    layout = "3.1" if ok is not None else "3.0"
    version = layout
    if version_line is not None and int(version_line) >= 50000:
        version = "5.0"
    fields = _fields(path, blocks, pk, ok, datadir)
    n = len(blocks[pk])
    table = ParticleTable(**fields, filename=path, source_rows=np.arange(n))
    table.source = {
        "format": "star", "version": version, "layout": layout, "version_line": version_line,
        "blocks": blocks, "particles": pk, "optics": ok,
        "dir": os.path.realpath(os.path.dirname(os.path.abspath(path))),
        "read_values": snapshot(table),
    }
    return table


# ---------------------------------------------------------------------------- writing
def _fmt(values) -> np.ndarray:
    """Numbers as text: ints as ints, floats as the shortest round-tripping decimal."""
    a = np.asarray(values)
    if a.dtype.kind in "iu":
        return np.array([str(int(v)) for v in a], dtype=object)
    return np.array([repr(float(v)) for v in a], dtype=object)


def _norm_version(version) -> str:
    v = str(version).strip().lower().lstrip("v")
    if v in ("3.0", "3", "30000", "relion3.0"):
        return "3.0"
    if v in ("3.1", "4", "4.0", "30001", "relion3.1"):
        return "3.1"
    if v in ("5", "5.0", "50001", "relion5"):
        return "5.0"
    raise JaxhetInputError(f"write_star: unknown STAR version {version!r} (use '3.0', '3.1' or '5.0')")


def _set(df: pd.DataFrame, col: str, mask: np.ndarray, values) -> None:
    """Write formatted ``values[mask]`` into ``df[col]`` (the whole column if it is new)."""
    text = _fmt(values)
    if col not in df.columns:
        df[col] = pd.Series(text, index=df.index, dtype=object)
        return
    if not mask.any():
        return
    colvals = df[col].to_numpy(dtype=object).copy()
    colvals[mask] = text[mask]
    df[col] = pd.Series(colvals, index=df.index, dtype=object)


def _optics_groups(table: ParticleTable, path: str = "") -> tuple[np.ndarray, pd.DataFrame]:
    """Optics groups (1-based) and their values; a group whose particles disagree is split."""
    if (table.box_size <= 0).any():
        raise JaxhetInputError(f"{path}: image size unknown for some particles; cannot write rlnImageSize")
    combos = pd.DataFrame({
        "g": table.optics_group, "kv": table.voltage_in_kilovolts,
        "cs": table.spherical_aberration_in_mm, "w": table.amplitude_contrast,
        "ps": table.pixel_size_in_angstroms, "box": table.box_size})
    uniq = combos.drop_duplicates().sort_values("g", kind="stable").reset_index(drop=True)
    if uniq["g"].is_unique and (uniq["g"] >= 1).all():
        new_g = uniq["g"].to_numpy()
    else:
        new_g = np.arange(1, len(uniq) + 1)
    uniq["new"] = new_g
    merged = combos.merge(uniq, on=list(combos.columns), how="left")
    return merged["new"].to_numpy(np.int64), uniq


def _image_names(table: ParticleTable, out_dir: str, keep: np.ndarray | None, old: np.ndarray | None) -> np.ndarray:
    codes, uniques = pd.factorize(pd.Series(table.stack_paths), sort=False)
    rel = np.array([relative_name(str(u), out_dir) for u in uniques], dtype=object)[codes]
    names = np.array([f"{i + 1:06d}@{r}" for i, r in zip(table.stack_indices, rel)], dtype=object)
    if keep is not None:
        names[keep] = old[keep]
    return names


def _check_table(path: str, table: ParticleTable) -> None:
    if not table.has_ctf:
        raise JaxhetInputError(f"{path}: the particles have no CTF parameters; a RELION STAR file needs them")


def _update_blocks(table: ParticleTable, src: dict, out_dir: str, path: str) -> dict:
    blocks = {k: (v.copy() if isinstance(v, pd.DataFrame) else dict(v)) for k, v in src["blocks"].items()}
    pk, ok = src["particles"], src["optics"]
    P = blocks[pk].iloc[table.source_rows].reset_index(drop=True)
    O = blocks[ok] if ok is not None else None
    n = len(table)
    layout = src["layout"]

    optics_fields = ["voltage_in_kilovolts", "spherical_aberration_in_mm", "amplitude_contrast",
                     "pixel_size_in_angstroms", "box_size", "optics_group"]
    optics_changed = any(table.changed(f).any() for f in optics_fields)
    if optics_changed:
        if layout == "3.1":
            groups, uniq = _optics_groups(table, path)
            old = O
            rows = []
            for _, u in uniq.iterrows():
                g = int(u["new"])
                row = {}
                if old is not None and "rlnOpticsGroup" in old:  # keep extra columns of that group
                    match = old[pd.to_numeric(old["rlnOpticsGroup"], errors="coerce") == int(u["g"])]
                    if len(match):
                        row = {c: match.iloc[0][c] for c in old.columns}
                row.update({"rlnOpticsGroupName": row.get("rlnOpticsGroupName", f"opticsGroup{g}"),
                            "rlnOpticsGroup": str(g), "rlnVoltage": repr(float(u["kv"])),
                            "rlnSphericalAberration": repr(float(u["cs"])),
                            "rlnAmplitudeContrast": repr(float(u["w"])),
                            "rlnImagePixelSize": repr(float(u["ps"])), "rlnImageSize": str(int(u["box"]))})
                if g != int(u["g"]):
                    row["rlnOpticsGroupName"] = f"opticsGroup{g}"
                rows.append(row)
            cols = list(old.columns) if old is not None else []
            cols += [c for c in rows[0] if c not in cols]
            O = pd.DataFrame(rows, columns=cols).fillna("")
            for c in ("rlnDetectorPixelSize", "rlnMagnification"):
                if c in O:
                    O = O.drop(columns=c)
            blocks[ok] = O
            # per-particle copies of optics labels would now disagree: drop them
            P = P.drop(columns=[c for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                                            "rlnImagePixelSize", "rlnImageSize", "rlnDetectorPixelSize",
                                            "rlnMagnification") if c in P])
            _set(P, "rlnOpticsGroup", np.ones(n, bool), groups)
        else:
            allm = np.ones(n, bool)
            _set(P, "rlnVoltage", allm, table.voltage_in_kilovolts)
            _set(P, "rlnSphericalAberration", allm, table.spherical_aberration_in_mm)
            _set(P, "rlnAmplitudeContrast", allm, table.amplitude_contrast)
            _set(P, "rlnImagePixelSize", allm, table.pixel_size_in_angstroms)
            if "rlnDetectorPixelSize" in P or "rlnMagnification" in P:
                _set(P, "rlnMagnification", allm, np.full(n, 10000.0))
                _set(P, "rlnDetectorPixelSize", allm, table.pixel_size_in_angstroms)
            if "rlnImageSize" in P:
                _set(P, "rlnImageSize", allm, table.box_size)
            if "rlnOpticsGroup" in P:
                _set(P, "rlnOpticsGroup", allm, table.optics_group)

    if table.has_poses:
        m = table.changed("euler_in_degrees")
        for k, c in enumerate(_ANGLES):
            _set(P, c, m, table.euler_in_degrees[:, k])
    m = table.changed("origin_in_pixels")
    if _ORIGIN_A[0] in P:
        if optics_changed:
            m = m | table.changed("pixel_size_in_angstroms")
        cols, scale = _ORIGIN_A, table.pixel_size_in_angstroms
    elif _ORIGIN_PX[0] in P:
        cols, scale = _ORIGIN_PX, np.ones(n)
    elif m.any():  # no origin columns yet: add them (all rows)
        cols = _ORIGIN_A if layout == "3.1" else _ORIGIN_PX
        scale = table.pixel_size_in_angstroms if layout == "3.1" else np.ones(n)
    else:
        cols = []
    for k, c in enumerate(cols):
        _set(P, c, m, table.origin_in_pixels[:, k] * scale)
    for name, col in (("defocus_u_in_angstroms", "rlnDefocusU"), ("defocus_v_in_angstroms", "rlnDefocusV"),
                      ("defocus_angle_in_degrees", "rlnDefocusAngle"),
                      ("phase_shift_in_degrees", "rlnPhaseShift"),
                      ("b_factor_in_angstroms2", "rlnCtfBfactor")):
        m = table.changed(name)
        if col in P or m.any():  # a new particle column (all rows) overrides any optics value
            _set(P, col, m, getattr(table, name))

    old_names = P["rlnImageName"].to_numpy(dtype=object)
    keep = ~(table.changed("stack_paths") | table.changed("stack_indices"))
    if os.path.realpath(out_dir or ".") != src["dir"] and keep.any():
        # keep a name only if it still resolves to the same file from the new folder
        stack_part = np.array([str(s).partition("@")[2] or str(s) for s in old_names], dtype=object)
        keep &= names_still_valid(stack_part, table.stack_paths, out_dir)
    if not keep.all():
        P["rlnImageName"] = pd.Series(_image_names(table, out_dir, keep, old_names), dtype=object)
    blocks[pk] = P
    return blocks


def _fresh_blocks(table: ParticleTable, layout: str, out_dir: str, path: str) -> dict:
    n = len(table)
    if layout == "3.1":
        groups, uniq = _optics_groups(table, path)
    P = pd.DataFrame({"rlnImageName": _image_names(table, out_dir, None, None)})
    allm = np.ones(n, bool)
    if table.has_poses:
        for k, c in enumerate(_ANGLES):
            _set(P, c, allm, table.euler_in_degrees[:, k])
    if layout == "3.1":
        for k, c in enumerate(_ORIGIN_A):
            _set(P, c, allm, table.origin_in_pixels[:, k] * table.pixel_size_in_angstroms)
    else:
        for k, c in enumerate(_ORIGIN_PX):
            _set(P, c, allm, table.origin_in_pixels[:, k])
    _set(P, "rlnDefocusU", allm, table.defocus_u_in_angstroms)
    _set(P, "rlnDefocusV", allm, table.defocus_v_in_angstroms)
    _set(P, "rlnDefocusAngle", allm, table.defocus_angle_in_degrees)
    _set(P, "rlnPhaseShift", allm, table.phase_shift_in_degrees)
    _set(P, "rlnCtfBfactor", allm, table.b_factor_in_angstroms2)
    # carry the extra columns of a STAR source (e.g. converting 3.1 -> 3.0)
    src = table.source
    if isinstance(src, dict) and src.get("format") == "star" and table.source_rows is not None:
        SP = src["blocks"][src["particles"]]
        for c in SP.columns:
            if c not in _MANAGED and c not in P:
                P[c] = SP[c].to_numpy(dtype=object)[table.source_rows]
    if layout == "3.1":
        _set(P, "rlnOpticsGroup", allm, groups)
        O = pd.DataFrame({
            "rlnOpticsGroupName": [f"opticsGroup{int(g)}" for g in uniq["new"]],
            "rlnOpticsGroup": _fmt(uniq["new"].to_numpy(np.int64)),
            "rlnVoltage": _fmt(uniq["kv"].to_numpy(np.float64)),
            "rlnSphericalAberration": _fmt(uniq["cs"].to_numpy(np.float64)),
            "rlnAmplitudeContrast": _fmt(uniq["w"].to_numpy(np.float64)),
            "rlnImagePixelSize": _fmt(uniq["ps"].to_numpy(np.float64)),
            "rlnImageSize": _fmt(uniq["box"].to_numpy(np.int64)),
            "rlnImageDimensionality": ["2"] * len(uniq)})
        return {"optics": O, "particles": P}
    _set(P, "rlnVoltage", allm, table.voltage_in_kilovolts)
    _set(P, "rlnSphericalAberration", allm, table.spherical_aberration_in_mm)
    _set(P, "rlnAmplitudeContrast", allm, table.amplitude_contrast)
    _set(P, "rlnMagnification", allm, np.full(n, 10000.0))
    _set(P, "rlnDetectorPixelSize", allm, table.pixel_size_in_angstroms)
    _set(P, "rlnImagePixelSize", allm, table.pixel_size_in_angstroms)
    if (table.box_size > 0).all():
        _set(P, "rlnImageSize", allm, table.box_size)
    return {"": P}


def star_text(table: ParticleTable, path: str = "particles.star", version: str | None = None) -> str:
    """The STAR file :func:`write_star` would write, as a string."""
    if version is None:
        src = table.source
        version = src["version"] if isinstance(src, dict) and src.get("format") == "star" else "3.1"
    version = _norm_version(version)
    layout = "3.0" if version == "3.0" else "3.1"
    _check_table(path, table)
    out_dir = os.path.dirname(os.path.abspath(path))
    src = table.source
    if isinstance(src, dict) and src.get("format") == "star" and src["layout"] == layout \
            and table.source_rows is not None:
        blocks = _update_blocks(table, src, out_dir, path)
        version_line = src["version_line"] if src["version"] == version else None
    else:
        blocks = _fresh_blocks(table, layout, out_dir, path)
        version_line = None
    if version_line is None and layout == "3.1":
        version_line = "50001" if version == "5.0" else "30001"
    text = starfile.to_string(blocks, float_format="%.6f", na_rep="")
    body = text.split("\n", 1)[1] if text.startswith("#") else text
    head = f"# version {version_line}\n" if version_line is not None else ""
    return head + "# written by jaxhet\n" + body


def write_star(path, table: ParticleTable, version: str | None = None, overwrite: bool = False) -> None:
    """Write a ParticleTable as a RELION STAR file.

    A table read by :func:`read_star` and written in the same layout keeps every block,
    column and value of the original file; values the table changed (poses, origins,
    CTF, optics, image names) and the selected rows (after ``subset``) are updated.
    Other tables are written anew: 3.1/5.0 with ``data_optics`` (one row per distinct
    set of optics values) and origins in Angstrom; 3.0 with per-particle optics and
    origins in pixels.

    Args:
        path: output STAR file.
        table: the particles.
        version: ``"3.0"``, ``"3.1"`` (also RELION 4) or ``"5.0"``; None (default): the
            version of the STAR file the table was read from, else ``"3.1"``.
        overwrite: replace an existing file.

    Raises:
        JaxhetInputError: the file exists (without overwrite), the table has no CTF, or
            an unknown version.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise JaxhetInputError(f"{path}: file exists (pass overwrite=True to replace it)")
    text = star_text(table, path, version)
    with open(path, "w") as f:
        f.write(text)
