"""Atomic structures for simulation: the bundled AdK states and transition path, PDB files.

Bundled (from MDAnalysisTests 2.11.0; PDB 1AKE closed / 4AKE open; DIMS transition):

- ``adk-transition``: 98 frames, closed (0) -> open (97), 1656 heavy atoms;
- ``adk-closed`` / ``adk-open``: frames 0 / 97 of that path (the same atoms);
- ``adk-closed-pdb`` / ``adk-open-pdb``: the all-atom PDB files (hydrogens dropped).

Coordinates are centred once for the whole trajectory (the mean position over all frames
and atoms goes to the origin), so the conformational motion is kept, not re-centred per
frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

import numpy as np

from jaxhet._errors import JaxhetInputError
from jaxhet.core import atomic_masses

__all__ = ["Structure", "load_structure", "read_pdb", "BUNDLED_STRUCTURES"]

BUNDLED_STRUCTURES = ("adk-transition", "adk-closed", "adk-open", "adk-closed-pdb", "adk-open-pdb")


@dataclass
class Structure:
    """A set of frames of one molecule.

    Attributes:
        coords_in_angstroms: [n_frames, n_atoms, 3] float32, centred.
        elements: [n_atoms] element symbols.
        masses: [n_atoms] scattering weights (atomic numbers).
        name: where it came from.
    """

    coords_in_angstroms: np.ndarray
    elements: np.ndarray
    masses: np.ndarray
    name: str

    @property
    def n_frames(self) -> int:
        return self.coords_in_angstroms.shape[0]

    @property
    def radius_in_angstroms(self) -> float:
        """Largest distance of an atom from the origin over all frames."""
        return float(np.sqrt((self.coords_in_angstroms ** 2).sum(-1)).max())


def _data_path(name: str) -> str:
    return str(resources.files("jaxhet.sim").joinpath("data", name))


def read_pdb(path: str, keep_hydrogens: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read ATOM/HETATM records of a PDB file -> (coords [n, 3] float32, elements [n])."""
    if not os.path.exists(path):
        raise JaxhetInputError(f"{path}: no such file")
    xyz, el = [], []
    with open(path) as fh:
        for line in fh:
            if not line.startswith(("ATOM", "HETATM")):
                continue
            try:
                x, y, z = float(line[30:38]), float(line[38:46]), float(line[46:54])
            except ValueError:
                raise JaxhetInputError(f"{path}: malformed coordinates in line {line.rstrip()!r}") from None
            e = line[76:78].strip() if len(line) >= 78 else ""
            if not e:  # infer from the atom name (CHARMM files have no element column)
                name = line[12:16].strip()
                e = name.lstrip("0123456789")[:1]
            if e.upper() == "H" and not keep_hydrogens:
                continue
            xyz.append((x, y, z))
            el.append(e.upper())
    if not xyz:
        raise JaxhetInputError(f"{path}: no ATOM records")
    return np.asarray(xyz, np.float32), np.asarray(el)


def load_structure(name_or_path: str) -> Structure:
    """A bundled structure by name, a ``.pdb`` file, or an ``.npz`` trajectory.

    An ``.npz`` must hold ``coords`` [n_frames, n_atoms, 3] (A) and ``element`` [n_atoms].
    """
    if name_or_path in ("adk-transition", "adk-closed", "adk-open"):
        d = np.load(_data_path("adk_dims_transition.npz"))
        coords = d["coords"].astype(np.float32)
        elements = d["element"]
        if name_or_path == "adk-closed":
            coords = coords[:1]
        elif name_or_path == "adk-open":
            coords = coords[-1:]
    elif name_or_path in ("adk-closed-pdb", "adk-open-pdb"):
        xyz, elements = read_pdb(_data_path(name_or_path.replace("-pdb", "").replace("-", "_") + ".pdb"))
        coords = xyz[None]
    elif name_or_path.endswith(".pdb"):
        xyz, elements = read_pdb(name_or_path)
        coords = xyz[None]
    elif name_or_path.endswith(".npz"):
        if not os.path.exists(name_or_path):
            raise JaxhetInputError(f"{name_or_path}: no such file")
        d = np.load(name_or_path)
        if "coords" not in d or "element" not in d:
            raise JaxhetInputError(f"{name_or_path}: needs arrays 'coords' [frames, atoms, 3] and 'element' [atoms]")
        coords = d["coords"].astype(np.float32)
        elements = d["element"]
        if coords.ndim != 3 or coords.shape[-1] != 3 or coords.shape[1] != len(elements):
            raise JaxhetInputError(f"{name_or_path}: coords shape {coords.shape} does not match {len(elements)} elements")
    else:
        raise JaxhetInputError(
            f"{name_or_path}: unknown structure (use a .pdb, an .npz trajectory, or one of {', '.join(BUNDLED_STRUCTURES)})")
    centre = coords.reshape(-1, 3).mean(0)
    coords = coords - centre
    return Structure(coords.astype(np.float32), np.asarray(elements), atomic_masses(elements), name_or_path)
