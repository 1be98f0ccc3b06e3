"""Fourier slicing: exact adjointness of gather/insert, interpolation, and the
central-slice theorem against analytic projections of Gaussian atoms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32, rel_err

from jaxhet.core import (
    VolumeFT, extract_slice, fft2_centered, fft3_centered, gather_trilinear, gaussian_atoms_fourier,
    gaussian_atoms_projection, gaussian_atoms_volume, image_frequencies, insert_slice, insert_trilinear, irfft2_centered, rfft2_centered,
    prepare_volume, project_volume, random_rotations, render_fourier, render_image, rotate_image_frequencies,
)

_insert = jax.jit(insert_slice, static_argnames=("padded_size", "box_size", "layout"))
_gather = jax.jit(gather_trilinear)
_insert_tri = jax.jit(insert_trilinear, static_argnames=("size",))

# <a, b> of float32 complex vectors of length n: rounding ~ eps * sqrt(n) * |a| |b|; allow a margin
ADJ_RTOL = 64 * EPS32


def _crandn(rng, shape):
    return jnp.asarray((rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64))


def _assert_adjoint(Sx, y, x, Sty):
    lhs = complex(jnp.vdot(Sx, y))
    rhs = complex(jnp.vdot(x, Sty))
    scale = float(jnp.linalg.norm(Sx) * jnp.linalg.norm(y) + jnp.linalg.norm(x) * jnp.linalg.norm(Sty))
    assert abs(lhs) > 1e-3 * scale  # the identity is not trivially 0 = 0
    assert abs(lhs - rhs) <= ADJ_RTOL * scale, (lhs, rhs)


@pytest.mark.parametrize("layout", ["half", "full"])
def test_extract_insert_slice_adjoint(rng, layout):
    D, pad = 16, 2
    P = D * pad
    x = _crandn(rng, (P, P, P))
    vft = VolumeFT(x, D, pad)
    extract = jax.jit(lambda A: extract_slice(vft, A, layout=layout))
    for A in random_rotations(jax.random.key(1), 3):
        Sx = extract(A)
        y = _crandn(rng, Sx.shape)
        Sty = _insert(y, A, padded_size=P, box_size=D, layout=layout)
        assert Sty.shape == (P, P, P)
        _assert_adjoint(Sx, y, x, Sty)


def test_batch_insert_is_adjoint_of_batched_extract(rng):
    """One scatter of concatenated coordinates = adjoint of the batch of slices."""
    D, pad = 12, 2
    P = D * pad
    x = _crandn(rng, (P, P, P))
    vft = VolumeFT(x, D, pad)
    As = random_rotations(jax.random.key(2), 5)
    Sx = jax.jit(jax.vmap(lambda A: extract_slice(vft, A)))(As)  # [B, D, D//2+1]
    y = _crandn(rng, Sx.shape)
    k = jnp.asarray(image_frequencies(D, "half"))
    coords = jax.vmap(lambda A: rotate_image_frequencies(k, A))(As) * (P / D)
    Sty = _insert_tri(coords, y, size=P)
    _assert_adjoint(Sx, y, x, Sty)
    # and equals the sum of single-slice backprojections
    Sty_sum = sum(_insert(y[i], As[i], padded_size=P, box_size=D) for i in range(len(As)))
    np.testing.assert_allclose(np.asarray(Sty), np.asarray(Sty_sum), atol=ADJ_RTOL * float(jnp.abs(Sty).max()))


@pytest.mark.parametrize("size", [9, 10])
def test_gather_insert_trilinear_adjoint_random_coords(rng, size):
    """Random coordinates, some of them outside the grid (they must contribute nothing)."""
    x = _crandn(rng, (size, size, size))
    coords = jnp.asarray(rng.uniform(-0.7 * size, 0.7 * size, (400, 3)).astype(np.float32))
    Sx = _gather(x, coords)
    y = _crandn(rng, Sx.shape)
    _assert_adjoint(Sx, y, x, _insert_tri(coords, y, size=size))
    # real-valued grid and values as well
    xr = jnp.asarray(rng.normal(size=(size,) * 3).astype(np.float32))
    yr = jnp.asarray(rng.normal(size=400).astype(np.float32))
    lhs = float(jnp.dot(_gather(xr, coords), yr))
    rhs = float(jnp.sum(xr * _insert_tri(coords, yr, size=size)))
    assert abs(lhs - rhs) <= ADJ_RTOL * float(jnp.linalg.norm(xr) * jnp.linalg.norm(yr) * 4)


def test_gather_trilinear_equals_eight_corner_reference(rng):
    """The (2,2,2)-block gather equals the plain 8-corner formula (weights (1-t) / t per axis,
    corners outside the grid dropped), for points inside, on the border and outside."""
    from jaxhet.core._slicing import _trilinear_corners

    for size in (6, 7):
        x = _crandn(rng, (size, size, size))
        coords = jnp.asarray(rng.uniform(-0.5 * size - 1.5, 0.5 * size + 1.5, (3000, 3)).astype(np.float32))
        idx, w = _trilinear_corners(coords, size)
        ref = jnp.sum(jnp.take(x.reshape(-1), idx) * w, -1)
        got = _gather(x, coords)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=16 * EPS32 * float(jnp.abs(x).max()))
        assert float(jnp.abs(ref).min()) == 0.0 and float(jnp.abs(ref).max()) > 0.5  # both cases present


def test_gather_trilinear_interpolates_linear_functions_exactly(rng):
    """Trilinear interpolation reproduces affine functions inside the grid, grid values at
    grid points, and returns 0 outside the grid. Coordinates are (x, y, z) from index P//2."""
    P = 11
    c = np.arange(P) - P // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    a = np.array([0.3, -1.2, 2.1])
    grid = jnp.asarray((a[0] * x + a[1] * y + a[2] * z + 0.5).astype(np.float32))
    pts = rng.uniform(-(P // 2), P // 2, (300, 3))  # the last cell [P//2-1, P//2] included
    got = _gather(grid, jnp.asarray(pts.astype(np.float32)))
    np.testing.assert_allclose(np.asarray(got), pts @ a + 0.5, atol=64 * EPS32 * 20)
    # grid points
    vol = jnp.asarray(rng.normal(size=(P, P, P)).astype(np.float32))
    ijk = rng.integers(0, P, (50, 3))  # (ix, iy, iz)
    got = _gather(vol, jnp.asarray((ijk - P // 2).astype(np.float32)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(vol)[ijk[:, 2], ijk[:, 1], ijk[:, 0]], atol=4 * EPS32 * 5)
    # outside
    out = _gather(vol, jnp.asarray([[P, 0, 0], [0, -P, 0], [0, 0, P // 2 + 1.5]], jnp.float32))
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_slice_at_identity_is_central_plane_and_projection(rng):
    """A = I, no padding/correction: the slice is exactly the kz=0 plane of the 3D DFT,
    which is the 2D DFT of the sum along z (index order z, y, x)."""
    D = 12
    vol = jnp.asarray(rng.normal(size=(D, D, D)).astype(np.float32))

    @jax.jit  # one compilation instead of op-by-op dispatch
    def compute(vol):
        vft = prepare_volume(vol, pad_factor=1, gridding_correction=False)
        half = extract_slice(vft, jnp.eye(3), layout="half")
        ref = rfft2_centered(vol.sum(0))
        return (extract_slice(vft, jnp.eye(3), layout="full"), fft3_centered(vol)[D // 2], fft2_centered(vol.sum(0)),
                half, ref, render_image(half, D), irfft2_centered(ref.at[:, -1].set(0.0), D))

    sl, plane, proj_ft, half, ref, img, ref_img = map(np.asarray, compute(vol))
    tol = 64 * EPS32 * np.abs(plane).max()
    np.testing.assert_allclose(sl, plane, atol=tol)
    np.testing.assert_allclose(sl, proj_ft, atol=tol)
    # half layout: the same values, except the +Nyquist column kx = +D/2, which lies
    # outside the centred grid (indices -D/2 .. D/2-1) and is returned as 0
    np.testing.assert_allclose(half[:, :-1], ref[:, :-1], atol=tol)
    np.testing.assert_array_equal(half[:, -1], 0.0)
    # and in real space: the projection along z (its +Nyquist column removed)
    np.testing.assert_allclose(img, ref_img, atol=64 * EPS32 * np.abs(ref_img).max())


# ----------------------------------------------------------------------------------------
# central-slice theorem against the analytic projection of Gaussian atoms


def _projection_errors(atoms, vft, n_poses=3, seed=0):
    pos, m, sig, D, a = atoms
    rng = np.random.default_rng(seed)
    As = random_rotations(jax.random.key(10 + seed), n_poses)
    shifts = jnp.asarray(rng.uniform(-4.0, 4.0, (n_poses, 2)).astype(np.float32))
    imgs = jax.jit(jax.vmap(lambda A, s: render_image(project_volume(vft, A, s, None, a), D)))(As, shifts)
    refs = jax.jit(jax.vmap(lambda A, s: gaussian_atoms_projection(pos, m, sig, A, D, a, s)))(As, shifts)
    return np.asarray([rel_err(i, r) for i, r in zip(imgs, refs)])


def test_central_slice_voxel_route_within_one_percent(atoms):
    """Voxel map -> prepare_volume(pad 2, gridding correction) -> slice -> image matches
    the analytic real-space projection to < 1% (object within 0.15 D of the centre;
    the trilinear error grows with the object's extent, ~2% at 0.3 D)."""
    pos, m, sig, D, a = atoms
    vol = gaussian_atoms_volume(pos, m, sig, D, a)
    errs = _projection_errors(atoms, prepare_volume(vol))
    assert errs.max() < 0.01, errs


def test_pad1_without_gridding_correction_is_measurably_worse(atoms):
    """Why the defaults are pad_factor=2 with gridding correction."""
    pos, m, sig, D, a = atoms
    vol = gaussian_atoms_volume(pos, m, sig, D, a)
    good = _projection_errors(atoms, prepare_volume(vol), n_poses=2)
    bad = _projection_errors(atoms, prepare_volume(vol, pad_factor=1, gridding_correction=False), n_poses=2)
    assert bad.min() > 5 * good.max(), (bad, good)
    assert bad.min() > 0.02


def test_central_slice_analytic_fourier_route(rng):
    """render_fourier(gaussian_atoms_fourier) -> image equals the analytic real-space
    projection (both are exact; only aliasing at Nyquist, ~1e-5 for sigma >= 1.5 px)."""
    D, a, n = 64, 2.0, 60
    from conftest import random_ball_positions

    pos = jnp.asarray(random_ball_positions(rng, n, 0.3 * D * a))
    m = jnp.asarray(rng.uniform(1.0, 10.0, n).astype(np.float32))
    sig = jnp.asarray((rng.uniform(1.5, 2.5, n) * a).astype(np.float32))

    def fourier_fn(k):
        return gaussian_atoms_fourier(pos, m, sig, k)

    for A in random_rotations(jax.random.key(3), 3):
        s = jnp.asarray(rng.uniform(-5.0, 5.0, 2).astype(np.float32))
        img = render_image(render_fourier(fourier_fn, A, s, None, D, a), D)
        ref = gaussian_atoms_projection(pos, m, sig, A, D, a, s)
        assert rel_err(img, ref) < 1e-4
