"""Rotations: RELION ZYZ Euler angles, matrices, quaternions, axis-angle, SO(3) grids.

Convention (Heymann et al. 2005, RELION ``Euler_angles2matrix``), angles in degrees,
a = rot, b = tilt, g = psi::

    A[0] = ( cg*cb*ca - sg*sa,   cg*cb*sa + sg*ca,  -cg*sb )
    A[1] = (-sg*cb*ca - cg*sa,  -sg*cb*sa + cg*ca,   sg*sb )
    A[2] = (      sb*ca,               sb*sa,          cb  )

The projection image at (x, y) integrates the map along z at volume coordinates
``A^T (x, y, z)``; in Fourier space the image frequency (kx, ky) samples the map's
transform at ``A^T (kx, ky, 0)``.

Quaternions are ``(w, x, y, z)`` with ``w >= 0`` on output. Every function works on
arrays with arbitrary leading batch dimensions and is jit/vmap/grad-clean.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "random_rotations",
    "healpix_directions",
    "so3_grid",
    "local_rotation_grid",
    "local_rotations",
    "perturb_rotations",
    "rotation_angle_between",
]


def euler_to_matrix(euler_in_degrees: Float[Array, "*batch 3"]) -> Float[Array, "*batch 3 3"]:
    """RELION Euler angles (rot, tilt, psi) in degrees -> rotation matrix A.

    Example:
        >>> A = euler_to_matrix(jnp.array([10.0, 20.0, 30.0]))
    """
    e = jnp.deg2rad(jnp.asarray(euler_in_degrees))
    ca, sa = jnp.cos(e[..., 0]), jnp.sin(e[..., 0])
    cb, sb = jnp.cos(e[..., 1]), jnp.sin(e[..., 1])
    cg, sg = jnp.cos(e[..., 2]), jnp.sin(e[..., 2])
    row0 = jnp.stack([cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb], -1)
    row1 = jnp.stack([-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb], -1)
    row2 = jnp.stack([sb * ca, sb * sa, cb], -1)
    return jnp.stack([row0, row1, row2], -2)


def matrix_to_euler(matrix: Float[Array, "*batch 3 3"]) -> Float[Array, "*batch 3"]:
    """Rotation matrix -> RELION Euler angles (rot, tilt, psi) in degrees.

    Follows RELION's ``Euler_matrix2angles``: tilt in [0, 180]; at the poles
    (sin(tilt) ~ 0) rot is set to 0 and psi carries the in-plane angle.
    """
    A = jnp.asarray(matrix)
    abs_sb = jnp.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    gamma = jnp.arctan2(A[..., 1, 2], -A[..., 0, 2])
    alpha = jnp.arctan2(A[..., 2, 1], A[..., 2, 0])
    beta = jnp.arctan2(abs_sb, A[..., 2, 2])
    north = A[..., 2, 2] > 0
    gamma_pole = jnp.where(north, jnp.arctan2(-A[..., 1, 0], A[..., 0, 0]),
                           jnp.arctan2(A[..., 1, 0], -A[..., 0, 0]))
    beta_pole = jnp.where(north, 0.0, jnp.pi)
    alpha = jnp.where(regular, alpha, 0.0)
    beta = jnp.where(regular, beta, beta_pole)
    gamma = jnp.where(regular, gamma, gamma_pole)
    return jnp.rad2deg(jnp.stack([alpha, beta, gamma], -1))


def quaternion_to_matrix(quaternion: Float[Array, "*batch 4"]) -> Float[Array, "*batch 3 3"]:
    """Unit quaternion (w, x, y, z) -> rotation matrix (normalises its input)."""
    q = jnp.asarray(quaternion)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return jnp.stack([
        jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def matrix_to_quaternion(matrix: Float[Array, "*batch 3 3"]) -> Float[Array, "*batch 4"]:
    """Rotation matrix -> unit quaternion (w, x, y, z) with w >= 0 (Shepperd's method)."""
    A = jnp.asarray(matrix)
    m00, m11, m22 = A[..., 0, 0], A[..., 1, 1], A[..., 2, 2]
    tr = m00 + m11 + m22
    # four candidate solutions; pick the numerically largest pivot
    q0 = jnp.stack([1 + tr, A[..., 2, 1] - A[..., 1, 2], A[..., 0, 2] - A[..., 2, 0], A[..., 1, 0] - A[..., 0, 1]], -1)
    q1 = jnp.stack([A[..., 2, 1] - A[..., 1, 2], 1 + m00 - m11 - m22, A[..., 0, 1] + A[..., 1, 0], A[..., 0, 2] + A[..., 2, 0]], -1)
    q2 = jnp.stack([A[..., 0, 2] - A[..., 2, 0], A[..., 0, 1] + A[..., 1, 0], 1 - m00 + m11 - m22, A[..., 1, 2] + A[..., 2, 1]], -1)
    q3 = jnp.stack([A[..., 1, 0] - A[..., 0, 1], A[..., 0, 2] + A[..., 2, 0], A[..., 1, 2] + A[..., 2, 1], 1 - m00 - m11 + m22], -1)
    cands = jnp.stack([q0, q1, q2, q3], -2)
    pivots = jnp.stack([tr, m00, m11, m22], -1)
    idx = jnp.argmax(pivots, axis=-1)
    q = jnp.take_along_axis(cands, idx[..., None, None], axis=-2)[..., 0, :]
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    return q * jnp.where(q[..., :1] < 0, -1.0, 1.0)


def axis_angle_to_matrix(rotvec: Float[Array, "*batch 3"]) -> Float[Array, "*batch 3 3"]:
    """Rotation vector (axis * angle in radians) -> matrix, via Rodrigues' formula.

    Smooth at zero (Taylor expansion of the coefficients), so gradients are finite.
    """
    v = jnp.asarray(rotvec)
    th2 = jnp.sum(v * v, -1)
    small = th2 < 1e-8
    th2s = jnp.where(small, 1.0, th2)
    th = jnp.sqrt(th2s)
    a = jnp.where(small, 1 - th2 / 6, jnp.sin(th) / th)
    b = jnp.where(small, 0.5 - th2 / 24, (1 - jnp.cos(th)) / th2s)
    zero = jnp.zeros_like(v[..., 0])
    K = jnp.stack([
        jnp.stack([zero, -v[..., 2], v[..., 1]], -1),
        jnp.stack([v[..., 2], zero, -v[..., 0]], -1),
        jnp.stack([-v[..., 1], v[..., 0], zero], -1),
    ], -2)
    eye = jnp.eye(3, dtype=v.dtype)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def matrix_to_axis_angle(matrix: Float[Array, "*batch 3 3"]) -> Float[Array, "*batch 3"]:
    """Rotation matrix -> rotation vector (axis * angle, radians, angle in [0, pi])."""
    q = matrix_to_quaternion(matrix)
    w = jnp.clip(q[..., 0], -1.0, 1.0)
    xyz = q[..., 1:]
    s = jnp.linalg.norm(xyz, axis=-1)
    angle = 2 * jnp.arctan2(s, w)
    scale = jnp.where(s < 1e-8, 2.0, angle / jnp.where(s < 1e-8, 1.0, s))
    return xyz * scale[..., None]


def random_rotations(key: Array, n: int) -> Float[Array, "n 3 3"]:
    """n rotations uniform on SO(3) (normalised Gaussian quaternions)."""
    q = jax.random.normal(key, (n, 4))
    return quaternion_to_matrix(q)


def rotation_angle_between(a: Float[Array, "*batch 3 3"], b: Float[Array, "*batch 3 3"]) -> Float[Array, "*batch"]:
    """Geodesic angle in degrees between two rotations: arccos((tr(a^T b) - 1) / 2).

    Evaluated as ``2 atan2(sin(t/2), cos(t/2))`` with ``||a - b||_F = 2 sqrt(2) sin(t/2)`` and
    ``1 + tr(a^T b) = 4 cos^2(t/2)``: accurate near 0 (arccos of a float32 trace has a
    ~0.03 degree floor there).
    """
    tr = jnp.einsum("...ij,...ij->...", a, b)
    half_sin = jnp.sqrt(jnp.sum((a - b) ** 2, axis=(-2, -1))) / (2 * math.sqrt(2.0))
    half_cos = jnp.sqrt(jnp.maximum(1 + tr, 0.0)) / 2
    return jnp.rad2deg(2 * jnp.arctan2(half_sin, half_cos))


def healpix_directions(nside: int) -> np.ndarray:
    """HEALPix RING-scheme pixel centres as (theta, phi) in radians, [12 nside^2, 2].

    Closed-form ``pix2ang_ring`` (Gorski et al. 2005), the sphere sampling RELION uses
    for viewing directions.
    """
    npix = 12 * nside * nside
    ncap = 2 * nside * (nside - 1)
    pix = np.arange(npix, dtype=np.int64)
    z = np.empty(npix)
    phi = np.empty(npix)
    north = pix < ncap
    south = pix >= npix - ncap
    eq = ~(north | south)
    p = pix[north]
    iring = (1 + np.floor(np.sqrt(1 + 2 * p)).astype(np.int64)) >> 1
    iphi = (p + 1) - 2 * iring * (iring - 1)
    z[north] = 1.0 - iring ** 2 / (3.0 * nside ** 2)
    phi[north] = (iphi - 0.5) * (np.pi / 2) / iring
    ip = pix[eq] - ncap
    tmp = ip // (4 * nside)
    iring = tmp + nside
    iphi = ip - 4 * nside * tmp + 1
    fodd = np.where((iring + nside) & 1, 1.0, 0.5)
    z[eq] = (2 * nside - iring) * 2.0 / (3.0 * nside)  # (2 nside - iring) * fact1, fact1 = 8 nside / npix
    phi[eq] = (iphi - fodd) * np.pi / (2 * nside)
    ip = npix - pix[south]
    iring = (1 + np.floor(np.sqrt(2 * ip - 1)).astype(np.int64)) >> 1
    iphi = 4 * iring + 1 - (ip - 2 * iring * (iring - 1))
    z[south] = -1.0 + iring ** 2 / (3.0 * nside ** 2)
    phi[south] = (iphi - 0.5) * (np.pi / 2) / iring
    return np.stack([np.arccos(np.clip(z, -1, 1)), phi], -1)


def so3_grid(step_in_degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """A near-uniform SO(3) grid for global pose search (HEALPix x in-plane, as RELION).

    Viewing directions come from a HEALPix sphere of order ``ceil(log2(58.6 / step))``
    (so the direction spacing is at most ``step``); the in-plane angle psi is sampled
    at the same spacing. The viewing direction of RELION angles (rot, tilt) is the
    third row of A, so directions map to ``rot = phi``, ``tilt = theta``.

    Args:
        step_in_degrees: target angular spacing.

    Returns:
        ``(matrices [M, 3, 3] float32, euler_in_degrees [M, 3] float32)``.
    """
    order = max(0, int(math.ceil(math.log2(58.6 / step_in_degrees))))
    nside = 2 ** order
    dirs = healpix_directions(nside)
    actual = 58.6 / nside
    n_psi = max(1, int(round(360.0 / actual)))
    psi = np.arange(n_psi) * (360.0 / n_psi) - 180.0
    rot = np.rad2deg(dirs[:, 1])
    rot = np.where(rot >= 180.0, rot - 360.0, rot)
    tilt = np.rad2deg(dirs[:, 0])
    eul = np.stack(np.broadcast_arrays(rot[:, None], tilt[:, None], psi[None, :]), -1).reshape(-1, 3)
    eul = eul.astype(np.float32)
    return _euler_to_matrix_np(eul).astype(np.float32), eul


def _euler_to_matrix_np(euler_in_degrees: np.ndarray) -> np.ndarray:
    """NumPy (float64) twin of :func:`euler_to_matrix` for static grids (usable under jit)."""
    a, b, g = np.moveaxis(np.deg2rad(np.asarray(euler_in_degrees, np.float64)), -1, 0)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.stack([
        np.stack([cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb], -1),
        np.stack([-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb], -1),
        np.stack([sb * ca, sb * sa, cb], -1),
    ], -2)


def _axis_angle_to_matrix_np(rotvec: np.ndarray) -> np.ndarray:
    """NumPy (float64) Rodrigues formula for static grids (usable under jit)."""
    v = np.asarray(rotvec, np.float64)
    th = np.linalg.norm(v, axis=-1)[..., None, None]
    safe = np.where(th > 0, th, 1.0)
    zero = np.zeros_like(v[..., 0])
    K = np.stack([
        np.stack([zero, -v[..., 2], v[..., 1]], -1),
        np.stack([v[..., 2], zero, -v[..., 0]], -1),
        np.stack([-v[..., 1], v[..., 0], zero], -1),
    ], -2) / safe
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * (K @ K)


def local_rotation_grid(max_angle_in_degrees: float, step_in_degrees: float) -> np.ndarray:
    """Small rotations on a cubic grid of rotation vectors inside a ball.

    Returns [M, 3, 3] matrices dR (the identity included) with angle <= max_angle.
    Compose as ``A @ dR`` (see :func:`local_rotations`).
    """
    n = int(math.floor(max_angle_in_degrees / step_in_degrees))
    g = np.arange(-n, n + 1) * np.deg2rad(step_in_degrees)
    v = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    v = v[np.linalg.norm(v, axis=-1) <= np.deg2rad(max_angle_in_degrees) + 1e-9]
    return _axis_angle_to_matrix_np(v).astype(np.float32)


def local_rotations(matrix: Float[Array, "*batch 3 3"], max_angle_in_degrees: float,
                    step_in_degrees: float) -> Float[Array, "*batch m 3 3"]:
    """The neighbourhood ``A @ dR`` of each rotation A on a local grid (see above)."""
    dR = jnp.asarray(local_rotation_grid(max_angle_in_degrees, step_in_degrees))
    return jnp.einsum("...ij,mjk->...mik", matrix, dR)


def perturb_rotations(key: Array, matrix: Float[Array, "*batch 3 3"], sigma_in_degrees: float) -> Float[Array, "*batch 3 3"]:
    """Right-multiply each rotation by exp(v), v ~ N(0, sigma^2 I) (radians)."""
    v = jax.random.normal(key, matrix.shape[:-2] + (3,)) * jnp.deg2rad(sigma_in_degrees)
    return matrix @ axis_angle_to_matrix(v)
