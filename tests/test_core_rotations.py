"""Rotations: the RELION Euler convention pinned independently of jaxhet's code (explicit
formula and scipy), round trips, uniform sampling, SO(3) grid coverage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32
from scipy import stats
from scipy.spatial.transform import Rotation

from jaxhet.core import healpix_directions, local_rotation_grid, so3_grid
import jaxhet.core as core

# jitted once per module: eager op-by-op dispatch of these small functions is slow to compile
euler_to_matrix = jax.jit(core.euler_to_matrix)
matrix_to_euler = jax.jit(core.matrix_to_euler)
quaternion_to_matrix = jax.jit(core.quaternion_to_matrix)
matrix_to_quaternion = jax.jit(core.matrix_to_quaternion)
axis_angle_to_matrix = jax.jit(core.axis_angle_to_matrix)
matrix_to_axis_angle = jax.jit(core.matrix_to_axis_angle)
rotation_angle_between = jax.jit(core.rotation_angle_between)
random_rotations = jax.jit(core.random_rotations, static_argnums=1)
local_rotations = jax.jit(core.local_rotations, static_argnums=(1, 2))
perturb_rotations = jax.jit(core.perturb_rotations, static_argnums=2)

MAT_TOL = 16 * EPS32  # a few roundings of products of sines/cosines


def _random_eulers(rng, n):
    """rot, psi in (-180, 180), tilt in (0, 180), away from the poles and the +-180 seam."""
    e = np.stack([rng.uniform(-179, 179, n), rng.uniform(1, 179, n), rng.uniform(-179, 179, n)], -1)
    return e.astype(np.float32)


def _relion_matrix_np(e):
    """CONVENTIONS.md's formula for RELION's Euler_angles2matrix, written out in float64."""
    a, b, g = np.deg2rad(np.asarray(e, np.float64)).T
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    A = np.empty(a.shape + (3, 3))
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


def test_euler_to_matrix_matches_conventions_formula_and_scipy(rng):
    e = _random_eulers(rng, 200)
    A = np.asarray(euler_to_matrix(jnp.asarray(e)))
    np.testing.assert_allclose(A, _relion_matrix_np(e), atol=MAT_TOL)
    # RELION's A is the transpose of scipy's intrinsic ZYZ rotation (rot about Z, then tilt
    # about the new Y, then psi about the new Z): a fully independent pin of the convention
    R = Rotation.from_euler("ZYZ", e.astype(np.float64), degrees=True).as_matrix()
    np.testing.assert_allclose(A, np.transpose(R, (0, 2, 1)), atol=MAT_TOL)
    # hand-checked special case: tilt = 90 about Y maps the viewing axis (z) onto the volume x axis
    A90 = np.asarray(euler_to_matrix(jnp.asarray([0.0, 90.0, 0.0])))
    np.testing.assert_allclose(A90, [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=MAT_TOL)
    # the projection direction (third row of A) is (sin tilt cos rot, sin tilt sin rot, cos tilt)
    t, r = np.deg2rad(e[:, 1]), np.deg2rad(e[:, 0])
    np.testing.assert_allclose(A[:, 2], np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], -1),
                               atol=MAT_TOL)


def _assert_rotation(M, tol=MAT_TOL * 4):
    M = np.asarray(M, np.float64)
    eye = np.broadcast_to(np.eye(3), M.shape)
    np.testing.assert_allclose(M @ np.swapaxes(M, -1, -2), eye, atol=tol)
    np.testing.assert_allclose(np.linalg.det(M), 1.0, atol=tol)


def test_all_constructors_give_proper_rotations(rng, key):
    _assert_rotation(euler_to_matrix(jnp.asarray(_random_eulers(rng, 50))))
    _assert_rotation(quaternion_to_matrix(jnp.asarray(rng.normal(size=(50, 4)).astype(np.float32))))
    _assert_rotation(axis_angle_to_matrix(jnp.asarray(rng.normal(size=(50, 3)).astype(np.float32))))
    _assert_rotation(random_rotations(key, 50))
    _assert_rotation(so3_grid(30.0)[0])
    _assert_rotation(local_rotation_grid(6.0, 2.0))


def test_euler_round_trip(rng):
    e = _random_eulers(rng, 300)
    back = np.asarray(matrix_to_euler(euler_to_matrix(jnp.asarray(e))))
    # angles: tolerance from float32 arctan2 of entries with error ~MAT_TOL, near tilt ~ 1 deg
    np.testing.assert_allclose(back, e, atol=0.05)
    # matrices: the exact check
    A = np.asarray(euler_to_matrix(jnp.asarray(e)))
    np.testing.assert_allclose(np.asarray(euler_to_matrix(jnp.asarray(back))), A, atol=MAT_TOL * 4)
    # matrix -> euler -> matrix for random rotations (any tilt)
    R = np.asarray(random_rotations(jax.random.key(5), 300))
    e2 = np.asarray(matrix_to_euler(jnp.asarray(R)))
    assert (e2[:, 1] >= 0).all() and (e2[:, 1] <= 180).all()
    np.testing.assert_allclose(np.asarray(euler_to_matrix(jnp.asarray(e2))), R, atol=MAT_TOL * 32)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_matrix_to_euler_at_the_poles(tilt):
    """At sin(tilt) = 0 only rot + psi (tilt 0) or psi - rot (tilt 180) is defined: RELION
    sets rot = 0 and puts the in-plane angle in psi; the matrix is preserved."""
    rot, psi = 30.0, 50.0
    A = euler_to_matrix(jnp.asarray([rot, tilt, psi]))
    e = np.asarray(matrix_to_euler(A))
    expected_psi = rot + psi if tilt == 0.0 else psi - rot
    np.testing.assert_allclose(e, [0.0, tilt, expected_psi], atol=1e-3)
    np.testing.assert_allclose(np.asarray(euler_to_matrix(jnp.asarray(e))), np.asarray(A), atol=MAT_TOL * 4)


def test_quaternion_round_trip_all_branches(rng):
    q = rng.normal(size=(400, 4))
    # include rotations near 180 degrees (w ~ 0) and near the identity, to hit every pivot
    q[:50, 0] = 1e-4 * rng.normal(size=50)
    q[50:60, 1:] *= 1e-3
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q = np.where(q[:, :1] < 0, -q, q).astype(np.float32)
    back = np.asarray(matrix_to_quaternion(quaternion_to_matrix(jnp.asarray(q))))
    assert (back[:, 0] >= 0).all()
    # q and -q are the same rotation; at w ~ 0 the sign is ambiguous
    err = np.minimum(np.abs(back - q).max(1), np.abs(back + q).max(1))
    assert err.max() < 1e-5
    # against scipy (scalar-last, active rotation: the same matrix)
    R = Rotation.from_quat(q[:, [1, 2, 3, 0]].astype(np.float64)).as_matrix()
    np.testing.assert_allclose(np.asarray(quaternion_to_matrix(jnp.asarray(q))), R, atol=MAT_TOL * 4)


def test_axis_angle_round_trip_and_scipy(rng):
    axis = rng.normal(size=(300, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = rng.uniform(0.0, np.pi - 1e-2, (300, 1))
    v = (axis * angle).astype(np.float32)
    M = axis_angle_to_matrix(jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(M), Rotation.from_rotvec(v.astype(np.float64)).as_matrix(), atol=MAT_TOL * 4)
    np.testing.assert_allclose(np.asarray(matrix_to_axis_angle(M)), v, atol=2e-5)
    np.testing.assert_allclose(np.asarray(rotation_angle_between(jnp.eye(3), M)), np.rad2deg(angle[:, 0]), atol=0.05)
    # the angle between rotations is accurate for small angles too (no arccos floor)
    small = jnp.asarray(axis * np.deg2rad(0.01), jnp.float32)[:20]
    A = euler_to_matrix(jnp.asarray(_random_eulers(rng, 20)))
    np.testing.assert_allclose(np.asarray(rotation_angle_between(A, A @ axis_angle_to_matrix(small))), 0.01, atol=2e-4)
    assert np.asarray(rotation_angle_between(A, A)).max() < 1e-4
    # tiny angles use the Taylor branch
    tiny = jnp.asarray([[1e-6, -2e-6, 3e-6], [0.0, 0.0, 0.0]], jnp.float32)
    np.testing.assert_allclose(np.asarray(axis_angle_to_matrix(tiny)),
                               Rotation.from_rotvec(np.asarray(tiny, np.float64)).as_matrix(), atol=MAT_TOL)


def test_random_rotations_are_uniform_on_so3():
    R = np.asarray(random_rotations(jax.random.key(7), 20000), np.float64)
    # Haar measure: E[A] = 0 (each entry has sd 1/sqrt(3) -> sd of the mean 0.004)
    assert np.abs(R.mean(0)).max() < 0.02
    e = np.asarray(matrix_to_euler(jnp.asarray(R, jnp.float32)), np.float64)
    # cos(tilt) uniform on [-1, 1]; rot and psi uniform on [-180, 180)
    assert stats.kstest(np.cos(np.deg2rad(e[:, 1])), stats.uniform(-1, 2).cdf).pvalue > 1e-3
    assert stats.kstest(e[:, 0], stats.uniform(-180, 360).cdf).pvalue > 1e-3
    assert stats.kstest(e[:, 2], stats.uniform(-180, 360).cdf).pvalue > 1e-3
    # rotation angle theta has density (1 - cos theta) / pi on [0, pi]
    theta = np.deg2rad(np.asarray(rotation_angle_between(jnp.eye(3), jnp.asarray(R, jnp.float32)), np.float64))
    assert stats.kstest(theta, lambda t: (t - np.sin(t)) / np.pi).pvalue > 1e-3
    # the same tests reject uniform Euler angles (i.e. they can fail)
    rng = np.random.default_rng(0)
    bad_tilt = rng.uniform(0, 180, 20000)
    assert stats.kstest(np.cos(np.deg2rad(bad_tilt)), stats.uniform(-1, 2).cdf).pvalue < 1e-6


def test_healpix_directions_known_layout_and_equal_coverage():
    d = healpix_directions(1)  # 12 pixels: rings at z = 2/3, 0, -2/3
    np.testing.assert_allclose(np.cos(d[:, 0]), [2 / 3] * 4 + [0] * 4 + [-2 / 3] * 4, atol=1e-12)
    np.testing.assert_allclose(np.rad2deg(d[:, 1]), [45, 135, 225, 315, 0, 90, 180, 270, 45, 135, 225, 315], atol=1e-9)
    # nside = 8: equal-area pixels -> z of the pixel centres is uniform on [-1, 1] (mean 0, var 1/3)
    d8 = healpix_directions(8)
    z = np.cos(d8[:, 0])
    assert len(z) == 768
    assert abs(z.mean()) < 1e-9 and abs(z.var() - 1 / 3) < 5e-3
    # every direction on the sphere is within ~the pixel size (58.6 / nside deg) of a centre
    rng = np.random.default_rng(3)
    u = rng.normal(size=(3000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = np.stack([np.sin(d8[:, 0]) * np.cos(d8[:, 1]), np.sin(d8[:, 0]) * np.sin(d8[:, 1]), z], -1)
    worst = np.rad2deg(np.arccos(np.clip((u @ c.T).max(1), -1, 1))).max()
    assert worst < 58.6 / 8


@pytest.mark.parametrize("step", [30.0, 15.0])
def test_so3_grid_covers_so3(step):
    mats, eul = so3_grid(step)
    np.testing.assert_allclose(np.asarray(euler_to_matrix(jnp.asarray(eul))), mats, atol=MAT_TOL * 4)
    R = np.asarray(random_rotations(jax.random.key(11), 2000))
    tr = np.einsum("nij,mij->nm", R, mats).max(1)
    nearest = np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1)))
    assert nearest.max() < step, nearest.max()
    # and it is not grossly oversampled: the SO(3) volume fraction of an angle-r ball is
    # (r - sin r)/pi, so covering radius ~step needs at most a few / that fraction points
    r = np.deg2rad(step)
    assert len(mats) < 40 * np.pi / (r - np.sin(r))


def test_local_rotations_max_angle_and_spacing(rng):
    A = euler_to_matrix(jnp.asarray(_random_eulers(rng, 3)))
    L = local_rotations(A, 6.0, 2.0)
    assert L.shape[:2] == (3, len(local_rotation_grid(6.0, 2.0)))
    ang = np.asarray(rotation_angle_between(A[:, None], L))
    assert ang.max() <= 6.0 + 1e-3
    assert ang.max() > 5.0  # fills the ball
    assert ang.min() < 1e-3  # contains A itself
    # every rotation within 5 deg of A is within ~step of the local grid
    dR = axis_angle_to_matrix(jnp.asarray(rng.normal(size=(500, 3)) * np.deg2rad(2.0), jnp.float32))
    dR = dR[np.asarray(rotation_angle_between(jnp.eye(3), dR)) < 5.0]
    targets = jnp.einsum("ij,njk->nik", A[0], dR)
    tr = np.einsum("nij,mij->nm", np.asarray(targets), np.asarray(L[0])).max(1)
    assert np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1))).max() < 2.0


def test_perturb_rotations_angle_scale(key):
    A = jnp.broadcast_to(euler_to_matrix(jnp.asarray([10.0, 40.0, -70.0])), (4000, 3, 3))
    P = perturb_rotations(key, A, 3.0)
    ang = np.asarray(rotation_angle_between(A, P))
    # angle = |v| with v ~ N(0, sigma^2 I_3): E[angle^2] = 3 sigma^2
    assert abs(np.sqrt(np.mean(ang ** 2)) / (3.0 * np.sqrt(3)) - 1) < 0.03
