"""Mean map by conjugate gradients (jaxhet.inference._linear): the normal operator is the
gradient of the least-squares loss written with the independent forward model of
jaxhet.core, PCG solves the normal equations, and on noise-free data the solution is the
ground-truth map; the linear hyper-molecule model and its movies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhet.core import CTFParams, origin_to_shift, prepare_volume, project_volume, rfft2_centered
from jaxhet.inference import (array_batches, conjugate_gradient, linear_movie, linear_operators, mean_normal_operator,
                              noise_psd_from_residuals, prepare_images, solve_mean)
from jaxhet.models import LinearModel

from test_linear_helpers import atom_family, simulate


def _data(imgs, R, orig, ctf, a, batch_size=64):
    return prepare_images(lambda: array_batches(imgs, R, orig, ctf, a, 100), batch_size=batch_size)


def test_conjugate_gradient_solves_spd_system(rng):
    A = rng.normal(size=(30, 30))
    A = A @ A.T + 0.1 * np.eye(30)
    b = rng.normal(size=30)
    d = np.diag(A)
    res = conjugate_gradient(lambda x: jnp.asarray(A) @ x, jnp.asarray(b), precondition=lambda r: r / jnp.asarray(d),
                             tol=1e-6, max_iter=200)
    assert res.converged and res.residual_norms[-1] <= 1e-6
    np.testing.assert_allclose(np.asarray(res.x), np.linalg.solve(A, b), rtol=1e-3, atol=1e-4)
    assert np.all(np.diff(res.residual_norms[:3]) < 0.5)  # it moves


def test_normal_operator_is_the_gradient_of_the_loss(rng):
    """S x - b == grad of 1/2 sum_i sum_k h |c T slice(x) - y|^2, the loss written with
    jaxhet.core.project_volume (an independent code path: no shared slicing code)."""
    D, a, N = 12, 4.0, 12
    vols = atom_family(D, a, [0.0])
    imgs, R, orig, ctf, _ = simulate(vols, np.zeros(N, int), a, seed=1)
    imgs = imgs + rng.normal(size=imgs.shape).astype(np.float32) * imgs.std()  # y != model
    data = _data(imgs, R, orig, ctf, a, batch_size=8)
    ops = linear_operators(D, data.fs)
    psd = 2.0
    S = mean_normal_operator(data, ops, psd)
    from jaxhet.inference._linear import _mean_passes, _noise_weights, _vols
    h = _noise_weights(ops, psd)
    acc = _mean_passes(data, ops, h, lambda b: b.image_weight)
    rhs = _vols(ops, acc[:, :1])[0]
    fs = data.fs
    hp = jnp.asarray(2.0 * fs.half_weight)
    flat = jnp.asarray(fs.flat_index)
    y = rfft2_centered(jnp.asarray(imgs)).reshape(N, -1)[:, flat]
    psd_k = psd
    w = hp / (D * D * psd_k)

    def loss(x):
        vft = prepare_volume(x)

        def one(Rm, o, c, yy):
            f = project_volume(vft, Rm, origin_to_shift(o), c, a).reshape(-1)[flat]
            return 0.5 * jnp.sum(w * jnp.abs(f - yy) ** 2)

        return jnp.sum(jax.vmap(one)(jnp.asarray(R), jnp.asarray(orig), CTFParams(*[jnp.asarray(c) for c in ctf]), y))

    x = jnp.asarray(vols[0] + 0.3 * rng.normal(size=vols[0].shape).astype(np.float32) * vols[0].std())
    g = jax.grad(loss)(x)
    got = S(x) - rhs
    err = float(jnp.linalg.norm(got - g) / jnp.linalg.norm(g))
    assert err < 2e-3, err
    # and S is symmetric (it is F^H G^H W G F)
    x2 = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    l, r = float(jnp.vdot(S(x), x2)), float(jnp.vdot(x, S(x2)))
    assert abs(l - r) <= 1e-4 * abs(l)


def test_cg_mean_matches_ground_truth_on_noise_free_data():
    D, a, N = 12, 5.0, 400
    vols = atom_family(D, a, [0.0], seed=3)
    imgs, R, orig, ctf, _ = simulate(vols, np.zeros(N, int), a, seed=2)
    data = _data(imgs, R, orig, ctf, a, batch_size=128)
    res = solve_mean(data, noise_psd=1.0, wiener=False, ridge=1e-6, tol=1e-5, max_iter=40)
    assert res.cg.converged and res.cg.n_iter < 40
    # the normal equations hold: ||(S + R) x - b|| <= tol ||b|| (checked independently of the solver's record)
    assert res.cg.residual_norms[-1] <= 1e-5
    err = np.linalg.norm(res.volume - vols[0]) / np.linalg.norm(vols[0])
    assert err < 0.02, err
    # a plain backprojection (one CG step) is far from it: CG does the work
    one = solve_mean(data, noise_psd=1.0, wiener=False, ridge=1e-6, tol=1e-5, max_iter=1)
    assert np.linalg.norm(one.volume - vols[0]) / np.linalg.norm(vols[0]) > 5 * err


def test_wiener_mean_of_noisy_data_and_weights():
    D, a, N = 12, 5.0, 600
    vols = atom_family(D, a, [0.0, 1.0], seed=4)
    labels = np.arange(N) % 2
    imgs, R, orig, ctf, sigma = simulate(vols, labels, a, seed=5, snr=0.5)
    data = _data(imgs, R, orig, ctf, a, batch_size=128)
    res = solve_mean(data, max_iter=15)
    from jaxhet.analysis import fsc
    f = fsc(res.volume, vols.mean(0))
    assert f[: D // 4].min() > 0.8
    psd = noise_psd_from_residuals(data, res.volume)
    assert np.median(psd) == pytest.approx(sigma ** 2, rel=0.05)
    # image weights select a class: the weighted mean is closer to that class
    w = (labels == 1).astype(np.float32)
    r1 = solve_mean(data, image_weights=w, max_iter=15)
    e1 = np.linalg.norm(r1.volume - vols[1])
    e0 = np.linalg.norm(r1.volume - vols[0])
    assert e1 < e0


def test_linear_model_volume_and_movie():
    D, a = 8, 3.0
    rng = np.random.default_rng(0)
    vols = rng.normal(size=(3, D, D, D)).astype(np.float32)
    m = LinearModel.from_volumes(vols, a)
    tau = np.array([0.5, -2.0], np.float32)
    np.testing.assert_allclose(np.asarray(m.volume(jnp.asarray(tau))), vols[0] + 0.5 * vols[1] - 2.0 * vols[2],
                               atol=1e-5)
    mv = linear_movie(vols, 2, [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(mv[0], vols[0] - vols[2], atol=1e-6)
    np.testing.assert_allclose(mv[1], vols[0], atol=1e-6)
