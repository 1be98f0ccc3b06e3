"""In-plane shifts: direction and sub-pixel accuracy; RELION origin sign."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import EPS32

import jaxhet.core as core
from jaxhet.core import (
    euler_to_matrix, gaussian_atoms_projection, image_frequencies, origin_to_shift, prepare_volume,
    render_image, gaussian_atoms_volume,
)

shift_image = jax.jit(core.shift_image)


def _gaussian_image(D, centre_xy, sigma):
    c = np.arange(D) - D // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    return np.exp(-((x - centre_xy[0]) ** 2 + (y - centre_xy[1]) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def _centroid(img):
    D = img.shape[-1]
    c = np.arange(D) - D // 2
    img = np.asarray(img, np.float64)
    return np.array([(img.sum(0) * c).sum(), (img.sum(1) * c).sum()]) / img.sum()


def test_shift_image_moves_centroid_subpixel():
    D = 48
    img = _gaussian_image(D, (1.0, -2.0), 3.0)
    for s in [(2.3, -1.7), (-4.61, 0.25), (0.5, 0.5)]:
        out = np.asarray(shift_image(jnp.asarray(img), jnp.asarray(s, jnp.float32)))
        np.testing.assert_allclose(_centroid(out), np.array([1.0, -2.0]) + s, atol=1e-4)
        # and the whole image is the analytically shifted Gaussian (positive sx -> larger x = column)
        ref = _gaussian_image(D, (1.0 + s[0], -2.0 + s[1]), 3.0)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        assert abs(out.sum() - img.sum()) < 1e-4 * img.sum()


def test_shift_phase_formula():
    D = 10
    k = image_frequencies(D, "half")
    s = np.array([1.25, -0.5])
    expected = np.exp(-2j * np.pi * (k[..., 0] * s[0] + k[..., 1] * s[1]) / D)
    got = np.asarray(core.shift_phase(jnp.asarray(k), jnp.asarray(s, jnp.float32), D))
    np.testing.assert_allclose(got, expected, atol=64 * EPS32)
    # an integer shift is a circular roll of the image
    img = np.random.default_rng(0).normal(size=(D, D)).astype(np.float32)
    out = np.asarray(shift_image(jnp.asarray(img), jnp.asarray([2.0, -3.0])))
    np.testing.assert_allclose(out, np.roll(img, (-3, 2), axis=(0, 1)), atol=64 * EPS32)


def test_origin_to_shift_sign_relion():
    """RELION: the particle centre sits at box centre MINUS origin. The model image for
    origin o is the centred projection translated by origin_to_shift(o) = -o, and
    translating that image by +o re-centres it."""
    D, a = 48, 1.0
    origin = np.array([3.0, -5.5], np.float32)
    s = origin_to_shift(jnp.asarray(origin))
    np.testing.assert_array_equal(np.asarray(s), -origin)
    # a single atom at the origin of the map
    pos = jnp.zeros((1, 3))
    vol = gaussian_atoms_volume(pos, jnp.ones(1), jnp.full(1, 2.0), D, a)
    vft = prepare_volume(vol)
    A = euler_to_matrix(jnp.asarray([20.0, 70.0, -40.0]))
    img = render_image(jax.jit(core.project_volume)(vft, A, s, None, a), D)
    # (slicing adds a faint ~0.4% background, which biases the whole-box centroid by ~0.02 px;
    # a sign error would be off by 2|o| ~ 10 px, a half-pixel centre error by 0.5 px)
    np.testing.assert_allclose(_centroid(img), -origin, atol=0.05)
    # the experimental image shifted by +origin is centred
    np.testing.assert_allclose(_centroid(shift_image(img, jnp.asarray(origin))), [0.0, 0.0], atol=0.05)
    # gaussian_atoms_projection uses the same translation convention
    ref = gaussian_atoms_projection(pos, jnp.ones(1), jnp.full(1, 2.0), A, D, a, s)
    np.testing.assert_allclose(_centroid(ref), -origin, atol=1e-4)
