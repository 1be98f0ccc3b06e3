"""Noise: SNR definition, PSD estimation (white and coloured), whitening, likelihoods."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import EPS32

from jaxhet.core import (
    add_white_noise, estimate_noise_psd, gaussian_atoms_projection, gaussian_log_likelihood,
    gaussian_log_likelihood_real, half_frequency_grid_2d, half_plane_weights, half_radial_index,
    irfft2_centered, noise_sigma_for_snr, psd_to_half_grid, random_rotations, rfft2_centered, whiten,
)

estimate_noise_psd_j = jax.jit(estimate_noise_psd)
ll_fourier = jax.jit(lambda i, m, p: gaussian_log_likelihood(rfft2_centered(i), rfft2_centered(m), p))


def _clean_images(n=32, D=64):
    rng = np.random.default_rng(0)
    pos = jnp.asarray(rng.uniform(-20, 20, (30, 3)).astype(np.float32))
    m = jnp.ones(30)
    sig = jnp.full(30, 3.0)
    Rs = random_rotations(jax.random.key(0), n)
    return jax.jit(jax.vmap(lambda R: gaussian_atoms_projection(pos, m, sig, R, D, 1.0)))(Rs)


def test_add_white_noise_at_snr():
    clean = _clean_images()
    for snr in (0.1, 0.01):
        sigma = noise_sigma_for_snr(clean, snr)
        noisy = add_white_noise(jax.random.key(1), clean, sigma)
        noise = noisy - clean
        got = float(jnp.var(clean) / jnp.var(noise))
        assert abs(got / snr - 1) < 0.02, got


def test_estimate_noise_psd_white():
    D, sigma = 32, 0.7
    noise = sigma * jax.random.normal(jax.random.key(2), (1024, D, D))
    psd = np.asarray(estimate_noise_psd_j(noise))
    assert psd.shape == (D // 2 + 1,)
    np.testing.assert_allclose(psd, sigma ** 2, rtol=0.05)


def _radial_filter(D):
    k = half_frequency_grid_2d(D)
    r = np.sqrt((k ** 2).sum(-1))
    return r, np.exp(-(r ** 2) / (2 * 7.0 ** 2)) + 0.1  # smooth, 10x dynamic range in power


def test_estimate_noise_psd_coloured_and_whiten():
    D, sigma = 32, 1.3
    r, H = _radial_filter(D)
    white = sigma * jax.random.normal(jax.random.key(3), (1024, D, D))
    coloured = irfft2_centered(rfft2_centered(white) * jnp.asarray(H, jnp.float32), D)
    psd = np.asarray(estimate_noise_psd_j(coloured))
    # expected: sigma^2 times the (Parseval-weighted) mean of H^2 over each integer shell
    rint, w = half_radial_index(D), half_plane_weights(D)
    expected = np.array([(w * H ** 2)[rint == s].sum() / w[rint == s].sum() for s in range(1, D // 2 + 1)])
    np.testing.assert_allclose(psd[1:], sigma ** 2 * expected, rtol=0.05)
    assert psd[1] / psd[-1] > 5  # really coloured
    # and close to filter^2 at the shell radius (the filter is smooth)
    np.testing.assert_allclose(psd[1:], sigma ** 2 * _radial_filter_at(np.arange(1, D // 2 + 1)) ** 2, rtol=0.1)
    # whitening with the estimate gives unit white noise
    wh = whiten(coloured, jnp.asarray(psd))
    np.testing.assert_allclose(np.asarray(estimate_noise_psd_j(wh))[1:], 1.0, rtol=0.05)
    # (the pixel variance is below 1: the corners beyond Nyquist get the Nyquist shell's PSD)
    # psd_to_half_grid puts each shell's value on its frequencies
    g = np.asarray(psd_to_half_grid(jnp.asarray(psd), D))
    np.testing.assert_array_equal(g, psd[np.minimum(rint, D // 2)])


def _radial_filter_at(radius):
    return np.exp(-(radius ** 2) / (2 * 7.0 ** 2)) + 0.1


def test_estimate_noise_psd_with_background_mask():
    D, sigma = 32, 0.5
    noise = sigma * jax.random.normal(jax.random.key(4), (1024, D, D))
    c = np.arange(D) - D // 2
    mask = ((c[:, None] ** 2 + c[None, :] ** 2) > 10 ** 2).astype(np.float32)  # solvent outside r=10
    # particles inside the mask must not matter
    signal = np.zeros((D, D), np.float32)
    signal[c[:, None] ** 2 + c[None, :] ** 2 < 8 ** 2] = 50.0
    psd = np.asarray(estimate_noise_psd_j(noise + signal, jnp.asarray(mask)))
    np.testing.assert_allclose(psd[1:], sigma ** 2, rtol=0.15)


def test_gaussian_log_likelihood_fourier_equals_real_space():
    rng = np.random.default_rng(5)
    for D in (16, 17):
        img = rng.normal(size=(D, D)).astype(np.float32)
        model = (0.3 * rng.normal(size=(D, D))).astype(np.float32)
        sigma = 0.8
        ll_f = float(ll_fourier(img, model, sigma ** 2))
        ll_r = float(gaussian_log_likelihood_real(jnp.asarray(img), jnp.asarray(model), sigma))
        ll_np = (-0.5 * ((img.astype(np.float64) - model) ** 2).sum() / sigma ** 2
                 - 0.5 * D * D * np.log(2 * np.pi * sigma ** 2))
        assert abs(ll_f - ll_r) < 1e-4 * abs(ll_r)
        assert abs(ll_r - ll_np) < 1e-5 * abs(ll_np)
        # a per-frequency PSD that is constant gives the same value
        ll_grid = float(ll_fourier(img, model, jnp.full((D, D // 2 + 1), sigma ** 2)))
        assert abs(ll_grid - ll_r) < 1e-4 * abs(ll_r)
