"""The forward model: gradients (vs finite differences, float64), jit/vmap consistency,
Fourier-cropped rendering, pixel-size independence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32, random_ctf_batch
from jax.test_util import check_grads

from jaxhet.core import (
    CTFParams, axis_angle_to_matrix, euler_to_matrix, gaussian_atoms_volume, gaussian_log_likelihood,
    image_frequencies, prepare_volume, project_volume, quaternion_to_matrix, random_rotations, render_batch,
    render_fourier, render_image, rfft2_centered, voxel_fourier_fn,
)


def _problem(D=16, a=3.0):
    """A small smooth map, one CTF, and an 'observed' image from a different pose (float64
    when called under enable_x64). Built in one jitted call (eager dispatch compiles op by op)."""
    rng = np.random.default_rng(0)
    pos = rng.uniform(-0.2, 0.2, (12, 3)) * D * a
    noise = rng.normal(size=(D, D // 2 + 1))

    @jax.jit
    def make(pos, noise):
        vol = gaussian_atoms_volume(pos, jnp.ones(12), jnp.full(12, 1.5 * a), D, a)
        c = CTFParams.create(12000.0, 11000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 40.0)
        A_obs = euler_to_matrix(jnp.asarray([10.0, 50.0, -30.0]))
        obs = project_volume(prepare_volume(vol), A_obs, jnp.asarray([0.7, -0.4]), c, a)
        return vol, c, obs + 0.05 * jnp.abs(obs).max() * noise

    return (*make(jnp.asarray(pos), jnp.asarray(noise)), a)


def _loss(vft, A, s, c, obs, a):
    return gaussian_log_likelihood(obs, project_volume(vft, A, s, c, a), 1.0) / obs.size


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        vol, c, obs, a = _problem()
        assert vol.dtype == jnp.float64
        vft = jax.jit(prepare_volume)(vol)
        s0 = jnp.asarray([0.3, -0.2])
        q0 = jnp.asarray([0.9, 0.1, 0.35, -0.2])
        v0 = jnp.asarray([0.2, 0.5, -0.3])

        f_map = jax.jit(lambda v: _loss(prepare_volume(v), quaternion_to_matrix(q0), s0, c, obs, a))
        f_quat = jax.jit(lambda q: _loss(vft, quaternion_to_matrix(q), s0, c, obs, a))
        f_aa = jax.jit(lambda v: _loss(vft, axis_angle_to_matrix(v), s0, c, obs, a))
        f_shift = jax.jit(lambda s: _loss(vft, quaternion_to_matrix(q0), s, c, obs, a))
        assert f_map(vol).dtype == jnp.float64

        # the loss is quadratic in the map: FD is exact up to rounding
        check_grads(f_map, (vol,), order=1, modes=("rev",), eps=1e-3, atol=1e-6, rtol=1e-6)
        # poses: trilinear interpolation is piecewise smooth; small steps stay within a cell
        check_grads(f_quat, (q0,), order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-6, rtol=1e-5)
        check_grads(f_aa, (v0,), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-5)
        # (not at v = 0 through the slicing: A = I puts every sample on a grid point, where
        # trilinear interpolation has kinks; the Taylor branch of the parametrisation itself:)
        aa = jax.jit(axis_angle_to_matrix)
        check_grads(aa, (jnp.zeros(3),), order=1, modes=("fwd", "rev"), eps=1e-6)
        check_grads(aa, (jnp.asarray([3e-5, -2e-5, 1e-5]),), order=1, modes=("fwd", "rev"), eps=1e-7)
        check_grads(f_shift, (s0,), order=1, modes=("fwd", "rev"), eps=1e-5, atol=1e-6, rtol=1e-6)
        # the checks are not vacuous: each loss clearly changes along a random direction
        # (directional derivative >> atol; uses the already compiled losses)
        rng = np.random.default_rng(0)
        for f, x, h in ((f_map, vol, 1e-3), (f_quat, q0, 1e-4), (f_aa, v0, 1e-4), (f_shift, s0, 1e-4)):
            d = jnp.asarray(rng.normal(size=x.shape))
            slope = (float(f(x + h * d)) - float(f(x - h * d))) / (2 * h)
            assert abs(slope) > 100 * 1e-6, slope


def test_gradients_float32_agree_with_float64():
    """The float32 gradient w.r.t. the pose is the float64 one to float32 accuracy."""
    v0 = np.array([0.2, 0.5, -0.3])

    def grad_pose(vol, c, obs, a, v):
        vft = prepare_volume(vol)
        return jax.grad(lambda v: _loss(vft, axis_angle_to_matrix(v), None, c, obs, a))(v)

    vol, c, obs, a = _problem()
    g32 = np.asarray(jax.jit(grad_pose, static_argnums=3)(vol, c, obs, a, jnp.asarray(v0, jnp.float32)))
    with jax.enable_x64(True):
        vol64, c64, obs64, _ = _problem()
        g64 = np.asarray(jax.jit(grad_pose, static_argnums=3)(vol64, c64, obs64, a, jnp.asarray(v0)))
    assert g32.dtype == np.float32 and g64.dtype == np.float64
    np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-4 * np.abs(g64).max())


def test_render_batch_jit_equals_python_loop():
    rng = np.random.default_rng(1)
    vol, _, _, a = _problem(D=24, a=2.0)
    D = 24
    vft = jax.jit(prepare_volume)(vol)
    B = 5
    Rs = random_rotations(jax.random.key(3), B)
    shifts = jnp.asarray(rng.uniform(-3, 3, (B, 2)).astype(np.float32))
    ctfs = random_ctf_batch(rng, B)
    fn = voxel_fourier_fn(vft, a)
    batch_ft = jax.jit(lambda R, s, c: render_batch(fn, R, s, c, D, a, real_space=False))(Rs, shifts, ctfs)
    batch_img = jax.jit(lambda R, s, c: render_batch(fn, R, s, c, D, a))(Rs, shifts, ctfs)
    assert batch_ft.shape == (B, D, D // 2 + 1) and batch_img.shape == (B, D, D)
    one_ft = jax.jit(lambda R, s, c: render_fourier(fn, R, s, c, D, a))  # one image at a time
    for i in range(B):
        ci = jax.tree_util.tree_map(lambda x: x[i], ctfs)
        one = one_ft(Rs[i], shifts[i], ci)
        scale = float(jnp.abs(one).max())
        np.testing.assert_allclose(np.asarray(batch_ft[i]), np.asarray(one), atol=256 * EPS32 * scale)
        img = np.fft.fftshift(np.fft.irfft2(np.asarray(one), s=(D, D)))  # render_image, by numpy
        np.testing.assert_allclose(np.asarray(batch_img[i]), img, atol=256 * EPS32 * np.abs(img).max())
    # the images differ from each other (the batch is not broadcasting one pose)
    assert float(jnp.abs(batch_img[0] - batch_img[1]).max()) > 0.1 * float(jnp.abs(batch_img[0]).max())


def test_project_volume_fourier_cropped_box_and_pixel_size_independence():
    """An image rendered at a smaller box holds the same Fourier samples as the full-size
    image (Fourier crop), with shifts in the small image's pixels; without CTF the
    rendered DFT does not depend on the pixel size."""
    vol, c, _, a = _problem(D=24, a=2.0)
    D, d = 24, 16
    vft = jax.jit(prepare_volume)(vol)
    A = euler_to_matrix(jnp.asarray([40.0, 100.0, 10.0]))
    s_small = jnp.asarray([1.5, -2.0])
    project = jax.jit(project_volume, static_argnames=("pixel_size", "box_size", "ctf_sign"))
    small = project(vft, A, s_small, c, pixel_size=a, box_size=d)
    full = project(vft, A, s_small * D / d, c, pixel_size=a)
    ky_small = image_frequencies(d)[:, 0, 1].astype(int)
    rows = ky_small % D  # the same ky rows in the full image's fftfreq order
    cols = np.arange(d // 2 + 1)
    # compare away from the small box's Nyquist row / column
    keep_r = np.abs(ky_small) < d // 2
    got = np.asarray(small)[keep_r][:, : d // 2]
    ref = np.asarray(full)[rows[keep_r]][:, cols[: d // 2]]
    np.testing.assert_allclose(got, ref, atol=256 * EPS32 * float(np.abs(ref).max()))
    # pixel size: no CTF -> identical DFTs (mass-per-voxel normalisation)
    f1 = project(vft, A, s_small, None, pixel_size=1.0)
    f3 = project(vft, A, s_small, None, pixel_size=3.0)
    np.testing.assert_allclose(np.asarray(f1), np.asarray(f3), atol=64 * EPS32 * float(jnp.abs(f1).max()))


def test_ctf_sign_in_forward_model():
    """cryoDRGN's sign flips the whole rendered image; RELION's keeps the DC positive."""
    vol, c, _, a = _problem(D=16, a=3.0)
    vft = jax.jit(prepare_volume)(vol)
    A = jnp.eye(3)
    project = jax.jit(project_volume, static_argnames=("pixel_size", "box_size", "ctf_sign"))
    f_rel = project(vft, A, None, c, pixel_size=a)
    f_drgn = project(vft, A, None, c, pixel_size=a, ctf_sign="cryodrgn")
    np.testing.assert_array_equal(np.asarray(f_drgn), -np.asarray(f_rel))
    dc = complex(f_rel[0, 0])  # half layout: DC at [0, 0]
    dc_no_ctf = complex(project(vft, A, None, None, pixel_size=a)[0, 0])
    assert dc.real > 0 and abs(dc - 0.1 * dc_no_ctf) < 16 * EPS32 * abs(dc)
