"""Float64 numpy versions of the rotation conversions the file formats need.

They follow exactly the conventions of :mod:`jaxhet.core._rotations` (RELION ZYZ Euler
angles, matrix ``A`` with rows as in CONVENTIONS.md; tests check the two agree), but run
in float64 numpy so that metadata round trips lose no precision and the data loader's
background thread never calls into JAX.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = ["euler_to_matrix_np", "matrix_to_euler_np", "axis_angle_to_matrix_np",
           "matrix_to_axis_angle_np"]


def euler_to_matrix_np(euler_in_degrees) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees [..., 3] -> A [..., 3, 3] (float64)."""
    e = np.deg2rad(np.asarray(euler_in_degrees, dtype=np.float64))
    ca, sa = np.cos(e[..., 0]), np.sin(e[..., 0])
    cb, sb = np.cos(e[..., 1]), np.sin(e[..., 1])
    cg, sg = np.cos(e[..., 2]), np.sin(e[..., 2])
    A = np.empty(e.shape[:-1] + (3, 3))
    A[..., 0, 0] = cg * cb * ca - sg * sa
    A[..., 0, 1] = cg * cb * sa + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cb * ca - cg * sa
    A[..., 1, 1] = -sg * cb * sa + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sb * ca
    A[..., 2, 1] = sb * sa
    A[..., 2, 2] = cb
    return A


def matrix_to_euler_np(matrix) -> np.ndarray:
    """A [..., 3, 3] -> RELION (rot, tilt, psi) in degrees, as RELION's Euler_matrix2angles.

    tilt is in [0, 180]; at the poles rot is 0 and psi carries the in-plane angle.
    """
    A = np.asarray(matrix, dtype=np.float64)
    abs_sb = np.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    gamma = np.arctan2(A[..., 1, 2], -A[..., 0, 2])
    alpha = np.arctan2(A[..., 2, 1], A[..., 2, 0])
    beta = np.arctan2(abs_sb, A[..., 2, 2])
    north = A[..., 2, 2] > 0
    gamma_pole = np.where(north, np.arctan2(-A[..., 1, 0], A[..., 0, 0]),
                          np.arctan2(A[..., 1, 0], -A[..., 0, 0]))
    alpha = np.where(regular, alpha, 0.0)
    beta = np.where(regular, beta, np.where(north, 0.0, np.pi))
    gamma = np.where(regular, gamma, gamma_pole)
    return np.rad2deg(np.stack([alpha, beta, gamma], -1))


def axis_angle_to_matrix_np(rotvec) -> np.ndarray:
    """Rotation vector (axis * angle, radians) [..., 3] -> matrix (Rodrigues, R v active)."""
    v = np.asarray(rotvec, dtype=np.float64)
    flat = v.reshape(-1, 3)
    if flat.shape[0] == 0:
        return np.zeros(v.shape[:-1] + (3, 3))
    return Rotation.from_rotvec(flat).as_matrix().reshape(v.shape[:-1] + (3, 3))


def matrix_to_axis_angle_np(matrix) -> np.ndarray:
    """Rotation matrix [..., 3, 3] -> rotation vector (angle in [0, pi])."""
    A = np.asarray(matrix, dtype=np.float64)
    flat = A.reshape(-1, 3, 3)
    if flat.shape[0] == 0:
        return np.zeros(A.shape[:-2] + (3,))
    return Rotation.from_matrix(flat).as_rotvec().reshape(A.shape[:-2] + (3,))
