"""Gaussian atoms: maps on a grid, analytic projections and analytic Fourier transforms.

An atom j with mass ``m_j``, centre ``mu_j`` (A) and width ``sigma_j`` (A) has density
``m_j N(r; mu_j, sigma_j^2 I)``. jaxhet's normalisation: map voxels and image pixels hold
*mass per voxel/pixel*, so that

    map[n]     = sum_j m_j a^3 N3(r_n; mu_j, sigma_j^2)
    image[x]   = sum_j m_j a^2 N2(x; (A mu_j)_xy + s, sigma_j^2)         (projection)
    F(k)       = sum_j m_j exp(-2 pi^2 sigma_j^2 |k|^2) exp(-2 pi i k . mu_j)   (k in 1/A)

and the DFT of a map equals F(k) independently of the pixel size a. Grid coordinates:
voxel n sits at ``(n - D//2) * a``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex, Float

from ._fourier import freqs_1d

__all__ = ["gaussian_atoms_volume", "gaussian_atoms_projection", "gaussian_atoms_fourier",
           "atomic_masses", "b_factor_to_sigma"]

_ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "P": 15, "S": 16, "MG": 12, "ZN": 30, "FE": 26,
                  "CA": 20, "NA": 11, "CL": 17, "K": 19, "MN": 25, "SE": 34}


def atomic_masses(elements) -> np.ndarray:
    """Atomic numbers of element symbols (a simple scattering weight), float32."""
    out = []
    for e in elements:
        e = str(e).strip().upper()
        if e not in _ATOMIC_NUMBER:
            e = e[:1]
        out.append(_ATOMIC_NUMBER.get(e, 6))
    return np.asarray(out, np.float32)


def b_factor_to_sigma(b_factor_in_angstroms2):
    """Gaussian width of an isotropic B-factor: exp(-B k^2/4) = exp(-2 pi^2 sigma^2 k^2)."""
    return jnp.sqrt(jnp.asarray(b_factor_in_angstroms2) / (8 * jnp.pi ** 2))


def _axis_coords(box_size: int, pixel_size: float):
    return jnp.asarray(freqs_1d(box_size), jnp.float32) * pixel_size


def gaussian_atoms_volume(positions_in_angstroms: Float[Array, "n 3"], masses: Float[Array, "n"],
                          sigmas_in_angstroms: Float[Array, "n"], box_size: int, pixel_size: float) -> Float[Array, "d d d"]:
    """Map [D, D, D] (z, y, x) of Gaussian atoms, sampled at voxel centres (separable).

    Example:
        >>> v = gaussian_atoms_volume(xyz, jnp.ones(len(xyz)), jnp.full(len(xyz), 1.5), 64, 2.0)
    """
    c = _axis_coords(box_size, pixel_size)
    pos = jnp.asarray(positions_in_angstroms)
    sig = jnp.broadcast_to(jnp.asarray(sigmas_in_angstroms, jnp.float32), pos.shape[:1])
    m = jnp.broadcast_to(jnp.asarray(masses, jnp.float32), pos.shape[:1])
    norm1 = pixel_size / (jnp.sqrt(2 * jnp.pi) * sig)  # a * N1, per axis
    gx = norm1[:, None] * jnp.exp(-0.5 * ((c[None] - pos[:, 0:1]) / sig[:, None]) ** 2)
    gy = norm1[:, None] * jnp.exp(-0.5 * ((c[None] - pos[:, 1:2]) / sig[:, None]) ** 2)
    gz = norm1[:, None] * jnp.exp(-0.5 * ((c[None] - pos[:, 2:3]) / sig[:, None]) ** 2)
    return jnp.einsum("n,nz,ny,nx->zyx", m, gz, gy, gx)


def gaussian_atoms_projection(positions_in_angstroms: Float[Array, "n 3"], masses: Float[Array, "n"],
                              sigmas_in_angstroms: Float[Array, "n"], rotation: Float[Array, "3 3"],
                              box_size: int, pixel_size: float,
                              shift_in_pixels: Float[Array, "2"] | None = None) -> Float[Array, "d d"]:
    """Analytic projection image [D, D] of Gaussian atoms at orientation A, translated by s.

    The image at (x, y) integrates the map along z at ``A^T (x, y, z)``, so an atom at mu
    projects to ``(A mu)_xy``.
    """
    pos = jnp.asarray(positions_in_angstroms) @ jnp.asarray(rotation).T
    if shift_in_pixels is not None:
        pos = pos.at[:, :2].add(jnp.asarray(shift_in_pixels) * pixel_size)
    c = _axis_coords(box_size, pixel_size)
    sig = jnp.broadcast_to(jnp.asarray(sigmas_in_angstroms, jnp.float32), pos.shape[:1])
    m = jnp.broadcast_to(jnp.asarray(masses, jnp.float32), pos.shape[:1])
    norm1 = pixel_size / (jnp.sqrt(2 * jnp.pi) * sig)
    gx = norm1[:, None] * jnp.exp(-0.5 * ((c[None] - pos[:, 0:1]) / sig[:, None]) ** 2)
    gy = norm1[:, None] * jnp.exp(-0.5 * ((c[None] - pos[:, 1:2]) / sig[:, None]) ** 2)
    return jnp.einsum("n,ny,nx->yx", m, gy, gx)


def gaussian_atoms_fourier(positions_in_angstroms: Float[Array, "n 3"], masses: Float[Array, "n"],
                           sigmas_in_angstroms: Float[Array, "n"], freqs_in_inverse_angstroms: Float[Array, "... 3"],
                           chunk: int = 512) -> Complex[Array, "..."]:
    """Analytic 3D Fourier transform of Gaussian atoms at frequencies k (1/A).

    ``F(k) = sum_j m_j exp(-2 pi^2 sigma_j^2 |k|^2 - 2 pi i k . mu_j)``; summed over atoms
    in chunks to bound memory.
    """
    k = jnp.asarray(freqs_in_inverse_angstroms)
    real_dtype = jnp.promote_types(k.dtype, jnp.float32)  # float32, or float64 under x64
    k = k.astype(real_dtype)
    pos = jnp.asarray(positions_in_angstroms, real_dtype)
    n = pos.shape[0]
    sig = jnp.broadcast_to(jnp.asarray(sigmas_in_angstroms, real_dtype), (n,))
    m = jnp.broadcast_to(jnp.asarray(masses, real_dtype), (n,))
    pad = (-n) % chunk
    pos = jnp.pad(pos, ((0, pad), (0, 0)))
    sig = jnp.pad(sig, (0, pad), constant_values=1.0)
    m = jnp.pad(m, (0, pad))
    k2 = jnp.sum(k * k, -1)
    kf = k.reshape(-1, 3)
    k2f = k2.reshape(-1)

    def body(acc, xs):
        p, s, mm = xs
        phase = -2 * jnp.pi * (kf @ p.T)  # [K, c]
        amp = mm[None] * jnp.exp(-2 * jnp.pi ** 2 * (s[None] ** 2) * k2f[:, None])
        return acc + jnp.sum(amp * jnp.cos(phase), 1) + 1j * jnp.sum(amp * jnp.sin(phase), 1), None

    xs = (pos.reshape(-1, chunk, 3), sig.reshape(-1, chunk), m.reshape(-1, chunk))
    acc, _ = jax.lax.scan(body, jnp.zeros(kf.shape[0], jnp.result_type(real_dtype, jnp.complex64)), xs)
    return acc.reshape(k.shape[:-1])
