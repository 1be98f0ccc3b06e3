"""Centred FFTs and layouts, Parseval weights, Hartley transform, Fourier cropping
(downsampling) against analytic Gaussians, radial averages, masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32, rel_err

from jaxhet.core import (
    fft2_centered, fft3_centered, fourier_crop_3d, fourier_pad_3d, frequency_grid_2d, frequency_grid_3d,
    gaussian_atoms_projection, gaussian_atoms_volume, half_frequency_grid_2d, half_plane_weights, hartley2,
    hartley3, ifft2_centered, ifft3_centered, ihartley2, ihartley3, image_frequencies, irfft2_centered,
    radial_average, radial_index, rfft2_centered, soft_circular_mask, spherical_mask, circular_mask,
)
import jaxhet.core as core


@pytest.mark.parametrize("D", [8, 9])
def test_centred_fft_dc_location(D, rng):
    # a constant image: all power at the centre index D//2 (real space and Fourier alike)
    f = np.array(fft2_centered(jnp.ones((D, D))))
    assert np.abs(f[D // 2, D // 2] - D * D) < 64 * EPS32 * D * D
    f[D // 2, D // 2] = 0
    assert np.abs(f).max() < 64 * EPS32 * D * D
    # a delta at the centre pixel: flat, real spectrum
    img = np.zeros((D, D), np.float32)
    img[D // 2, D // 2] = 1.0
    np.testing.assert_allclose(np.asarray(fft2_centered(jnp.asarray(img))), 1.0, atol=16 * EPS32)
    vol = np.zeros((D, D, D), np.float32)
    vol[D // 2, D // 2, D // 2] = 1.0
    np.testing.assert_allclose(np.asarray(fft3_centered(jnp.asarray(vol))), 1.0, atol=16 * EPS32)
    # a delta at x = +1 (column D//2 + 1): F(kx, ky) = exp(-2 pi i kx / D), kx on the last axis
    img = np.zeros((D, D), np.float32)
    img[D // 2, D // 2 + 1] = 1.0
    kx = frequency_grid_2d(D)[..., 0]
    np.testing.assert_allclose(np.asarray(fft2_centered(jnp.asarray(img))), np.exp(-2j * np.pi * kx / D),
                               atol=64 * EPS32)
    # inverses
    x = rng.normal(size=(D, D, D)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ifft3_centered(fft3_centered(jnp.asarray(x)))).real, x, atol=256 * EPS32)
    np.testing.assert_allclose(np.asarray(ifft2_centered(fft2_centered(jnp.asarray(x[0])))).real, x[0],
                               atol=256 * EPS32)


@pytest.mark.parametrize("D", [10, 11])
def test_rfft2_half_layout_round_trip_and_parseval(D, rng):
    img = rng.normal(size=(3, D, D)).astype(np.float32)
    h = rfft2_centered(jnp.asarray(img))
    assert h.shape == (3, D, D // 2 + 1)
    np.testing.assert_allclose(np.asarray(irfft2_centered(h, D)), img, atol=256 * EPS32)
    # the half layout holds the centred spectrum's values at (kx, ky) = half_frequency_grid_2d
    full = np.asarray(fft2_centered(jnp.asarray(img)))
    k = half_frequency_grid_2d(D).astype(int)
    # (the +Nyquist column kx = D/2 of even D is the -Nyquist one of the centred layout)
    iy, ix = (D // 2 + k[..., 1]) % D, (D // 2 + k[..., 0]) % D
    np.testing.assert_allclose(np.asarray(h), full[:, iy, ix], atol=256 * EPS32 * D)
    np.testing.assert_array_equal(image_frequencies(D, "half"), half_frequency_grid_2d(D))
    np.testing.assert_array_equal(image_frequencies(D, "full"), frequency_grid_2d(D))
    # Parseval: sum w |F_half|^2 = sum |F_full|^2 = D^2 sum img^2
    w = half_plane_weights(D)
    lhs = (w * np.abs(np.asarray(h)) ** 2).sum((-2, -1))
    np.testing.assert_allclose(lhs, (np.abs(full) ** 2).sum((-2, -1)), rtol=64 * EPS32)
    np.testing.assert_allclose(lhs, D * D * (img.astype(np.float64) ** 2).sum((-2, -1)), rtol=64 * EPS32)
    assert w.sum() == D * D


def _hartley_direct(x):
    """Centred DHT by its definition H(k) = sum_n x(n) cas(2 pi k.n / D), cas = cos + sin."""
    D = x.shape[-1]
    c = np.arange(D) - D // 2
    phase = 2 * np.pi * np.outer(c, c) / D  # [k, n]
    cas = np.cos(phase) + np.sin(phase)
    if x.ndim == 2:
        # cas(a + b) = cas(a) cos(b) + cas(-a) sin(b): build the 2D kernel explicitly instead
        ky, kx, y, x_ = np.meshgrid(c, c, c, c, indexing="ij")
        ph = 2 * np.pi * (ky * y + kx * x_) / D
        return np.einsum("abyx,yx->ab", np.cos(ph) + np.sin(ph), x)
    raise NotImplementedError


@pytest.mark.parametrize("D", [6, 7])
def test_hartley_real_self_inverse_and_definition(D, rng):
    x = rng.normal(size=(D, D)).astype(np.float32)
    h = hartley2(jnp.asarray(x))
    assert not jnp.iscomplexobj(h)
    np.testing.assert_allclose(np.asarray(h), _hartley_direct(x.astype(np.float64)), atol=256 * EPS32 * D)
    np.testing.assert_allclose(np.asarray(ihartley2(h)), x, atol=256 * EPS32)
    np.testing.assert_allclose(np.asarray(hartley2(h)) / D ** 2, x, atol=256 * EPS32)
    v = rng.normal(size=(D, D, D)).astype(np.float32)
    h3 = hartley3(jnp.asarray(v))
    assert not jnp.iscomplexobj(h3)
    np.testing.assert_allclose(np.asarray(ihartley3(h3)), v, atol=256 * EPS32 * D)


def test_downsample_2d_equals_analytic_gaussian_at_coarse_pixel(rng):
    """A band-limited image (Gaussian atoms, sigma >= 1.5 coarse px), Fourier-cropped from
    D=64 at 1 A/px to D=32, equals the analytic rendering at 2 A/px with mass per pixel."""
    n = 20
    pos = jnp.asarray(rng.uniform(-12.0, 12.0, (n, 3)).astype(np.float32))
    m = jnp.asarray(rng.uniform(1.0, 5.0, n).astype(np.float32))
    sig = jnp.asarray(rng.uniform(3.0, 4.0, n).astype(np.float32))
    A = jnp.eye(3)

    @jax.jit  # one compilation instead of op-by-op dispatch
    def compute(pos, m, sig):
        fine = gaussian_atoms_projection(pos, m, sig, A, 64, 1.0)
        coarse = gaussian_atoms_projection(pos, m, sig, A, 32, 2.0)
        pos3 = pos * 0.5  # well inside the 32 A box
        vfine = gaussian_atoms_volume(pos3, m, sig, 32, 1.0)
        vcoarse = gaussian_atoms_volume(pos3, m, sig, 16, 2.0)
        return (core.downsample_2d(fine, 32), coarse, core.downsample_2d(jnp.stack([fine, 2 * fine]), 32),
                vfine, core.downsample_3d(vfine, 16), vcoarse)

    down, coarse, down_b, vfine, vdown, vcoarse = map(np.asarray, compute(pos, m, sig))
    assert rel_err(down, coarse) < 1e-4
    np.testing.assert_allclose(down.sum(), float(m.sum()), rtol=1e-5)  # mass conserved
    # batched, 3D as well
    np.testing.assert_allclose(down_b[1], 2 * down, atol=1e-6 * np.abs(down).max())
    # (3D: the even-size crop keeps one Nyquist plane per axis; 1e-3 level)
    assert rel_err(vdown, vcoarse) < 3e-3
    np.testing.assert_allclose(vdown.sum(), vfine.sum(), rtol=1e-5)


def test_fourier_crop_pad_3d_inverse(rng):
    f = jnp.asarray(rng.normal(size=(6, 6, 6)).astype(np.float32))
    padded = fourier_pad_3d(f, 10)
    assert padded.shape == (10, 10, 10)
    assert float(padded[5, 5, 5]) == float(f[3, 3, 3])  # centres (DC) aligned
    np.testing.assert_array_equal(np.asarray(fourier_crop_3d(padded, 6)), np.asarray(f))
    assert float(jnp.abs(padded).sum()) == pytest.approx(float(jnp.abs(f).sum()))


@pytest.mark.parametrize("shape", [(32, 32), (17, 17, 17)])
def test_radial_average_of_radial_functions(shape):
    axes = [np.arange(n) - n // 2 for n in shape]
    r = np.sqrt(sum(g.astype(np.float64) ** 2 for g in np.meshgrid(*axes, indexing="ij")))
    rint = np.round(r).astype(int)
    np.testing.assert_array_equal(radial_index(shape), rint)
    n = shape[-1] // 2 + 1
    # a function of the shell index: recovered exactly in every shell
    g = np.cos(0.7 * np.arange(n + 30))
    np.testing.assert_allclose(np.asarray(radial_average(jnp.asarray(g[rint], jnp.float32))), g[:n], atol=256 * EPS32)
    # a smooth radial profile: the shell mean is the profile at the shell radius, up to
    # its curvature over the +-0.5 shell width
    prof = lambda x: np.exp(-(x ** 2) / (2 * 6.0 ** 2))
    got = np.asarray(radial_average(jnp.asarray(prof(r), jnp.float32)))
    np.testing.assert_allclose(got[1:], prof(np.arange(1, n)), atol=0.02)
    assert abs(got[0] - 1.0) < 1e-6  # the centre alone


def test_masks():
    D = 64
    m = spherical_mask(D, 20.0)
    assert abs(m.sum() / (4 / 3 * np.pi * 20 ** 3) - 1) < 0.02
    soft = spherical_mask(D, 20.0, soft_width=6.0)
    assert soft.max() == 1.0 and soft.min() == 0.0 and ((soft > 0) & (soft < 1)).any()
    assert m.sum() < soft.sum() < spherical_mask(D, 26.0).sum()
    c = circular_mask(D, 10.0)
    assert abs(c.sum() / (np.pi * 100) - 1) < 0.03
    sc = soft_circular_mask(D, 10.0, 4.0)
    assert sc[D // 2, D // 2] == 1.0 and sc[0, 0] == 0.0
    # raised cosine: 0.5 at radius + width / 2
    assert abs(sc[D // 2, D // 2 + 12] - 0.5) < 1e-6
    g3 = frequency_grid_3d(8, pixel_size=2.0)
    assert g3.shape == (8, 8, 8, 3)
    np.testing.assert_allclose(g3[4, 4, 5], [1 / 16, 0, 0])  # +x on the last index axis
