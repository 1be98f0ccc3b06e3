"""ParticleTable: per-particle metadata of a single-particle data set, in one set of units.

Whatever file it came from (RELION STAR, cryoSPARC .cs, cryoDRGN pkls), a table holds:

* where each image is: ``stack_paths`` (file names; a relative name in the metadata file
  is joined to the metadata file's folder) and ``stack_indices`` (0-based);
* its pose: RELION Euler angles ``euler_in_degrees`` (rot, tilt, psi), and
  ``origin_in_pixels`` (x, y) with RELION's sign: the projected particle centre sits at
  box centre MINUS origin, so shifting the image by +origin centres it;
* its CTF in RELION's convention (defocus in A, angles in degrees);
* its optics (voltage, Cs, amplitude contrast, pixel size, box), expanded per particle.

``source`` keeps what the reader needs to write the original file back exactly (the STAR
blocks, the .cs structured array, ...), and ``source_rows`` maps each table row to its
row in that source, so subsets and edits write back with every other column intact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxhet._errors import JaxhetInputError
from jaxhet.core._ctf import CTFParams
from jaxhet.io._geometry import euler_to_matrix_np

__all__ = ["ParticleTable"]

# per-particle array fields, in the order of the dataclass
_FLOAT1 = ["defocus_u_in_angstroms", "defocus_v_in_angstroms", "defocus_angle_in_degrees",
           "phase_shift_in_degrees", "b_factor_in_angstroms2", "voltage_in_kilovolts",
           "spherical_aberration_in_mm", "amplitude_contrast", "pixel_size_in_angstroms"]
_INT1 = ["stack_indices", "optics_group", "box_size"]
ARRAY_FIELDS = (["stack_paths", "stack_indices", "euler_in_degrees", "origin_in_pixels"]
                + _FLOAT1[:5] + ["optics_group"] + _FLOAT1[5:] + ["box_size"])


@dataclass(eq=False)
class ParticleTable:
    """N particles' image locations, poses, CTF and optics (numpy arrays).

    Attributes:
        stack_paths: [N] str (object array), image stack file of each particle.
        stack_indices: [N] int64, 0-based index of the image in its stack.
        euler_in_degrees: [N, 3] float64 RELION (rot, tilt, psi); NaN when absent.
        origin_in_pixels: [N, 2] float64 RELION origin (x, y) in pixels (particle centre
            = box centre - origin); 0 when absent.
        defocus_u_in_angstroms, defocus_v_in_angstroms: [N] float64 (+ = underfocus).
        defocus_angle_in_degrees: [N] float64 astigmatism angle.
        phase_shift_in_degrees: [N] float64.
        b_factor_in_angstroms2: [N] float64 CTF envelope B-factor.
        optics_group: [N] int64 (1-based as in RELION).
        voltage_in_kilovolts, spherical_aberration_in_mm, amplitude_contrast: [N] float64.
        pixel_size_in_angstroms: [N] float64.
        box_size: [N] int64 image size in pixels (0 = unknown).
        has_poses: whether the poses are meaningful.
        has_ctf: whether the CTF parameters are meaningful.
        filename: the metadata file it was read from (for error messages).
        source: format-specific data to write the original file back (or None).
        source_rows: [N] int64 row of each particle in ``source`` (or None).
    """

    stack_paths: np.ndarray
    stack_indices: np.ndarray
    euler_in_degrees: np.ndarray
    origin_in_pixels: np.ndarray
    defocus_u_in_angstroms: np.ndarray
    defocus_v_in_angstroms: np.ndarray
    defocus_angle_in_degrees: np.ndarray
    phase_shift_in_degrees: np.ndarray
    b_factor_in_angstroms2: np.ndarray
    optics_group: np.ndarray
    voltage_in_kilovolts: np.ndarray
    spherical_aberration_in_mm: np.ndarray
    amplitude_contrast: np.ndarray
    pixel_size_in_angstroms: np.ndarray
    box_size: np.ndarray
    has_poses: bool = True
    has_ctf: bool = True
    filename: str = ""
    source: Any = field(default=None, repr=False)
    source_rows: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        paths = np.asarray(self.stack_paths, dtype=object).reshape(-1)
        n = paths.shape[0]
        self.stack_paths = paths
        self.stack_indices = np.asarray(self.stack_indices, dtype=np.int64).reshape(n)
        self.euler_in_degrees = np.asarray(self.euler_in_degrees, dtype=np.float64).reshape(n, 3)
        self.origin_in_pixels = np.asarray(self.origin_in_pixels, dtype=np.float64).reshape(n, 2)
        for name in _FLOAT1:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(n))
        for name in ("optics_group", "box_size"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(n))
        if self.source_rows is not None:
            self.source_rows = np.asarray(self.source_rows, dtype=np.int64).reshape(n)
        for name in ARRAY_FIELDS:  # views of pandas/np.load buffers may be read-only
            a = getattr(self, name)
            if not a.flags.writeable:
                setattr(self, name, a.copy())
        self.has_poses = bool(self.has_poses)
        self.has_ctf = bool(self.has_ctf)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def create(cls, stack_paths, stack_indices=None, *, n: int | None = None,
               euler_in_degrees=None, origin_in_pixels=None,
               defocus_u_in_angstroms=None, defocus_v_in_angstroms=None,
               defocus_angle_in_degrees=0.0, phase_shift_in_degrees=0.0,
               b_factor_in_angstroms2=0.0, optics_group=1, voltage_in_kilovolts=300.0,
               spherical_aberration_in_mm=2.7, amplitude_contrast=0.1,
               pixel_size_in_angstroms, box_size, filename: str = "") -> "ParticleTable":
        """Build a table from arrays or scalars (scalars broadcast to N particles).

        Args:
            stack_paths: one file name for all particles or [N] names.
            stack_indices: [N] 0-based indices (default ``arange(N)``).
            n: number of particles when nothing else fixes it.
            euler_in_degrees: [N, 3] or None (then ``has_poses=False``).
            origin_in_pixels: [N, 2] or None (zeros).
            defocus_u_in_angstroms: [N] or scalar, or None (then ``has_ctf=False``).
            defocus_v_in_angstroms: defaults to defocus_u.
            pixel_size_in_angstroms, box_size: scalars or [N].
            (other CTF/optics fields: scalars or [N].)

        Returns:
            ParticleTable with no ``source`` (written fresh by the writers).
        """
        sizes = [np.shape(x)[0] for x in (stack_indices, euler_in_degrees, origin_in_pixels,
                                          defocus_u_in_angstroms)
                 if x is not None and np.ndim(x) > 0]
        if not isinstance(stack_paths, (str, bytes)) and np.ndim(stack_paths) > 0:
            sizes.append(len(stack_paths))
        if n is not None:
            sizes.append(int(n))
        if not sizes:
            raise JaxhetInputError("ParticleTable.create: cannot tell the number of particles (give n)")
        if len(set(sizes)) != 1:
            raise JaxhetInputError(f"ParticleTable.create: arrays disagree on the number of particles {sorted(set(sizes))}")
        N = sizes[0]

        def full(x, dtype):
            return np.broadcast_to(np.asarray(x, dtype=dtype), (N,)).copy()

        if isinstance(stack_paths, (str, bytes)) or np.ndim(stack_paths) == 0:
            paths = np.empty(N, dtype=object)
            paths[:] = str(stack_paths)
        else:
            paths = np.array([str(p) for p in stack_paths], dtype=object)
        has_poses = euler_in_degrees is not None
        euler = (np.full((N, 3), np.nan) if euler_in_degrees is None
                 else np.asarray(euler_in_degrees, np.float64).reshape(N, 3))
        origin = (np.zeros((N, 2)) if origin_in_pixels is None
                  else np.asarray(origin_in_pixels, np.float64).reshape(N, 2))
        has_ctf = defocus_u_in_angstroms is not None
        du = full(np.nan if defocus_u_in_angstroms is None else defocus_u_in_angstroms, np.float64)
        dv = du.copy() if defocus_v_in_angstroms is None else full(defocus_v_in_angstroms, np.float64)
        return cls(
            stack_paths=paths,
            stack_indices=np.arange(N) if stack_indices is None else stack_indices,
            euler_in_degrees=euler, origin_in_pixels=origin,
            defocus_u_in_angstroms=du, defocus_v_in_angstroms=dv,
            defocus_angle_in_degrees=full(defocus_angle_in_degrees, np.float64),
            phase_shift_in_degrees=full(phase_shift_in_degrees, np.float64),
            b_factor_in_angstroms2=full(b_factor_in_angstroms2, np.float64),
            optics_group=full(optics_group, np.int64),
            voltage_in_kilovolts=full(voltage_in_kilovolts, np.float64),
            spherical_aberration_in_mm=full(spherical_aberration_in_mm, np.float64),
            amplitude_contrast=full(amplitude_contrast, np.float64),
            pixel_size_in_angstroms=full(pixel_size_in_angstroms, np.float64),
            box_size=full(box_size, np.int64),
            has_poses=has_poses, has_ctf=has_ctf, filename=filename)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.stack_paths.shape[0])

    def __repr__(self) -> str:
        return (f"ParticleTable(n={len(self)}, file={self.filename!r}, has_poses={self.has_poses}, "
                f"has_ctf={self.has_ctf}, optics_groups={sorted(set(self.optics_group.tolist()))})")

    def copy(self) -> "ParticleTable":
        """A copy with its own arrays (``source`` is shared: it is never modified)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ARRAY_FIELDS:
            kw[name] = kw[name].copy()
        if self.source_rows is not None:
            kw["source_rows"] = self.source_rows.copy()
        return ParticleTable(**kw)

    def subset(self, idx) -> "ParticleTable":
        """The particles selected by ``idx`` (int array, boolean mask or slice), as a new table.

        The new table's ``source_rows`` still point into the original ``source``, so
        writing the subset keeps every column of the original file for those rows.
        """
        if isinstance(idx, slice):
            sel = np.arange(len(self))[idx]
        else:
            sel = np.asarray(idx)
            if sel.dtype == bool:
                if sel.shape != (len(self),):
                    raise JaxhetInputError(
                        f"{self.filename or 'table'}: mask of length {sel.shape} for {len(self)} particles")
                sel = np.nonzero(sel)[0]
            sel = sel.astype(np.int64).reshape(-1)
            if sel.size and (sel.min() < -len(self) or sel.max() >= len(self)):
                raise JaxhetInputError(
                    f"{self.filename or 'table'}: particle index out of range for {len(self)} particles")
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ARRAY_FIELDS:
            kw[name] = kw[name][sel]
        if self.source_rows is not None:
            kw["source_rows"] = self.source_rows[sel]
        return ParticleTable(**kw)

    # ------------------------------------------------------------------ derived values
    def rotation_matrices(self, idx=None) -> np.ndarray:
        """RELION rotation matrices A [N, 3, 3] float32 (NaN where poses are absent).

        The image frequency (kx, ky) samples the map's transform at ``A^T (kx, ky, 0)``.
        """
        e = self.euler_in_degrees if idx is None else self.euler_in_degrees[idx]
        return euler_to_matrix_np(e).astype(np.float32)

    def ctf_params(self, idx=None) -> CTFParams:
        """CTF parameters (RELION convention) as a CTFParams of float32 numpy arrays [N]."""
        def g(a):
            return np.asarray(a if idx is None else a[idx], dtype=np.float32)
        return CTFParams(g(self.defocus_u_in_angstroms), g(self.defocus_v_in_angstroms),
                         g(self.defocus_angle_in_degrees), g(self.voltage_in_kilovolts),
                         g(self.spherical_aberration_in_mm), g(self.amplitude_contrast),
                         g(self.phase_shift_in_degrees), g(self.b_factor_in_angstroms2))

    @property
    def pixel_size(self) -> float:
        """The common pixel size in A; JaxhetInputError if particles disagree or it is unknown."""
        ps = self.pixel_size_in_angstroms
        name = self.filename or "particle table"
        if ps.size == 0:
            raise JaxhetInputError(f"{name}: no particles")
        if not np.isfinite(ps).all() or ps.min() <= 0:
            raise JaxhetInputError(f"{name}: pixel size unknown or not positive")
        lo, hi = float(ps.min()), float(ps.max())
        if hi - lo > 1e-6 * hi:
            vals = ", ".join(f"{v:g}" for v in np.unique(ps)[:5])
            raise JaxhetInputError(
                f"{name}: particles have different pixel sizes ({vals} A); select one optics group")
        return float(ps[0])

    @property
    def box(self) -> int:
        """The common image size in pixels; JaxhetInputError if particles disagree or it is unknown."""
        b = self.box_size
        name = self.filename or "particle table"
        if b.size == 0:
            raise JaxhetInputError(f"{name}: no particles")
        if (b <= 0).any():
            raise JaxhetInputError(f"{name}: image size unknown (stack file missing?)")
        if b.min() != b.max():
            vals = ", ".join(str(v) for v in np.unique(b)[:5])
            raise JaxhetInputError(
                f"{name}: particles have different box sizes ({vals} px); select one optics group")
        return int(b[0])

    def changed(self, name: str) -> np.ndarray:
        """[N] bool: rows whose field ``name`` differs from what was read from ``source``.

        Every row counts as changed for a table without a ``source`` snapshot.
        """
        cur = getattr(self, name)
        snap = None
        if isinstance(self.source, dict):
            snap = self.source.get("read_values", {}).get(name)
        if snap is None or self.source_rows is None:
            return np.ones(len(self), bool)
        old = snap[self.source_rows]
        if cur.dtype == object or old.dtype == object:
            diff = cur != old
        else:
            diff = ~((cur == old) | (np.isnan(cur) & np.isnan(old))) if cur.dtype.kind == "f" else cur != old
        if diff.ndim > 1:
            diff = diff.any(axis=tuple(range(1, diff.ndim)))
        return np.asarray(diff, bool)


def snapshot(table: ParticleTable) -> dict:
    """Copies of the array fields as read (stored in ``source['read_values']``)."""
    return {name: getattr(table, name).copy() for name in ARRAY_FIELDS}
