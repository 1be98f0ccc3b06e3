"""Gaussian atoms: mass normalisation, analytic Fourier transform vs the voxel map's DFT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import EPS32, random_ball_positions

from jaxhet.core import (
    atomic_masses, b_factor_to_sigma, fft3_centered, frequency_grid_3d, gaussian_atoms_fourier,
    gaussian_atoms_projection, gaussian_atoms_volume, euler_to_matrix,
)


def _molecule(rng, n, D, a, sig_px=(1.0, 2.0)):
    pos = jnp.asarray(random_ball_positions(rng, n, 0.25 * D * a))
    m = jnp.asarray(rng.uniform(1.0, 10.0, n).astype(np.float32))
    sig = jnp.asarray((rng.uniform(*sig_px, n) * a).astype(np.float32))
    return pos, m, sig


def test_volume_and_projection_sum_to_total_mass(rng):
    D, a = 32, 1.5
    pos, m, sig = _molecule(rng, 30, D, a)
    vol = gaussian_atoms_volume(pos, m, sig, D, a)
    assert vol.shape == (D, D, D)
    total = float(m.sum())
    # sampled Gaussians with sigma >= 1 px sum to their mass (Poisson: error ~exp(-2 pi^2 sigma^2))
    np.testing.assert_allclose(float(vol.sum()), total, rtol=64 * EPS32)
    img = gaussian_atoms_projection(pos, m, sig, euler_to_matrix(jnp.asarray([30.0, 60.0, 90.0])), D, a)
    np.testing.assert_allclose(float(img.sum()), total, rtol=64 * EPS32)
    # index order (z, y, x): an atom displaced along +x moves the mass along the last axis
    one = gaussian_atoms_volume(jnp.asarray([[3.0 * a, 0.0, 0.0]]), jnp.ones(1), jnp.full(1, a), D, a)
    assert np.unravel_index(int(jnp.argmax(one)), one.shape) == (D // 2, D // 2, D // 2 + 3)


def test_gaussian_atoms_fourier_at_zero_and_symmetry(rng):
    pos, m, sig = _molecule(rng, 700, 32, 1.0)  # > one chunk of 512 atoms
    f0 = gaussian_atoms_fourier(pos, m, sig, jnp.zeros((1, 3)))
    np.testing.assert_allclose(complex(f0[0]), float(m.sum()), rtol=64 * EPS32)
    k = jnp.asarray(rng.normal(size=(20, 3)).astype(np.float32) * 0.1)
    fk, fmk = gaussian_atoms_fourier(pos, m, sig, k), gaussian_atoms_fourier(pos, m, sig, -k)
    np.testing.assert_allclose(np.asarray(fmk), np.conj(np.asarray(fk)), atol=1e-4 * float(m.sum()))  # real density
    # a single atom: magnitude exp(-2 pi^2 sigma^2 |k|^2), phase -2 pi k . mu
    mu = np.array([[3.0, -1.0, 2.0]], np.float32)
    f1 = np.asarray(gaussian_atoms_fourier(jnp.asarray(mu), jnp.ones(1) * 2.0, jnp.full(1, 1.5), k))
    kk = np.asarray(k, np.float64)
    np.testing.assert_allclose(f1, 2.0 * np.exp(-2 * np.pi ** 2 * 1.5 ** 2 * (kk ** 2).sum(-1) - 2j * np.pi * kk @ mu[0]),
                               atol=64 * EPS32 * 10)


def test_voxel_map_dft_matches_analytic_fourier(rng):
    """fft3_centered(map) = F(k) at k = grid frequency / (D a): the map's DFT values do not
    depend on the pixel size (mass-per-voxel normalisation)."""
    D = 24
    for a in (1.0, 2.5):
        pos, m, sig = _molecule(rng, 40, D, a, sig_px=(1.5, 2.0))
        vol = gaussian_atoms_volume(pos, m, sig, D, a)
        dft = np.asarray(fft3_centered(vol))
        k = jnp.asarray(frequency_grid_3d(D, pixel_size=a))
        ana = np.asarray(gaussian_atoms_fourier(pos, m, sig, k))
        # differences: aliasing of the sampled Gaussians at Nyquist (~exp(-2 pi^2 1.5^2 / 4) of
        # the mass for the narrowest atoms) and float32 FFT rounding
        err = np.abs(dft - ana).max() / float(m.sum())
        assert err < 1e-4, err


def test_atomic_masses_and_b_factor():
    np.testing.assert_array_equal(atomic_masses(["C", "N", "O", "S", "P", "H", " fe", "X"]),
                                  [6, 7, 8, 16, 15, 1, 26, 6])
    assert atomic_masses(["C"]).dtype == np.float32
    B = 80.0
    s = float(b_factor_to_sigma(B))
    k = 0.2
    assert abs(np.exp(-2 * np.pi ** 2 * s ** 2 * k ** 2) - np.exp(-B * k ** 2 / 4)) < 1e-7
