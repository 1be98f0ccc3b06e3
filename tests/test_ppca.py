"""Probabilistic PCA by EM (jaxhet.inference.fit_ppca): the E-step posterior equals the
Gaussian posterior computed by brute force with the independent forward model of
jaxhet.core, EM increases the evidence, and the coefficients order a synthetic linear
family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from jaxhet.core import CTFParams, origin_to_shift, prepare_volume, project_volume, rfft2_centered
from jaxhet.inference import (array_batches, estimate_covariance, fit_ppca, posterior_coefficients, prepare_images,
                              rotate_to_principal_axes)

from test_linear_helpers import atom_family, simulate


def test_posterior_matches_brute_force(rng):
    D, a, N, K = 12, 4.0, 5, 2
    vols = atom_family(D, a, [0.0, 0.5, 1.0], seed=2)
    imgs, R, orig, ctf, _ = simulate(vols[:1], np.zeros(N, int), a, seed=3)
    imgs = imgs + rng.normal(size=imgs.shape).astype(np.float32) * imgs.std()
    X = np.stack([vols[0], vols[2] - vols[1], 0.5 * rng.normal(size=vols[0].shape).astype(np.float32) * vols[0].std()])
    psd = 0.7 * float(imgs.var())
    data = prepare_images(lambda: array_batches(imgs, R, orig, ctf, a, 8), batch_size=4)  # 2 batches, one padded
    mu, cov, _ = posterior_coefficients(data, X, psd)
    fs = data.fs
    flat = np.asarray(fs.flat_index)
    hp = 2.0 * np.asarray(fs.half_weight)
    h = hp / (D * D * psd)
    y = np.asarray(rfft2_centered(jnp.asarray(imgs))).reshape(N, -1)[:, flat]
    for i in range(N):
        c = CTFParams(*[jnp.asarray(x[i]) for x in ctf])
        proj = [np.asarray(project_volume(prepare_volume(jnp.asarray(x)), jnp.asarray(R[i]),
                                          origin_to_shift(jnp.asarray(orig[i])), c, a)).reshape(-1)[flat] for x in X]
        A = np.stack(proj[1:], 1)
        r = y[i] - proj[0]
        lam = np.eye(K) + np.real(A.conj().T @ (h[:, None] * A))
        beta = np.real(A.conj().T @ (h * r))
        np.testing.assert_allclose(mu[i], np.linalg.solve(lam, beta), rtol=3e-3, atol=3e-3 * np.abs(mu[i]).max())
        np.testing.assert_allclose(cov[i], np.linalg.inv(lam), rtol=3e-3, atol=1e-5)


def test_rotation_to_principal_axes_keeps_the_model():
    rng = np.random.default_rng(0)
    vols = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
    mu = rng.normal(size=(7, 2)).astype(np.float32)
    cov = np.tile(np.eye(2, dtype=np.float32) * 0.3, (7, 1, 1))
    v2, mu2, cov2, Q = rotate_to_principal_axes(vols, mu, cov)
    W, W2 = vols[1:].reshape(2, -1), v2[1:].reshape(2, -1)
    np.testing.assert_allclose(mu2 @ W2, mu @ W, atol=1e-4)  # same maps for every image
    g = W2 @ W2.T
    assert abs(g[0, 1]) < 1e-4 * g[0, 0] and g[0, 0] >= g[1, 1]  # orthogonal, ordered
    np.testing.assert_allclose(Q.T @ Q, np.eye(2), atol=1e-6)


def test_ppca_coefficients_order_a_linear_family():
    D, a, N = 16, 5.0, 1200
    ts = np.linspace(-1, 1, 9)
    vols = atom_family(D, a, ts, n_atoms=24, n_moving=8, shift_in_angstroms=(6.0, 0.0, 0.0), seed=7)
    labels = np.random.default_rng(1).integers(0, len(ts), N)
    imgs, R, orig, ctf, sigma = simulate(vols, labels, a, seed=9, snr=1.0)
    data = prepare_images(lambda: array_batches(imgs, R, orig, ctf, a, 600), batch_size=200)
    mask = np.ones((D,) * 3, np.float32)
    mean = vols.mean(0)
    init = estimate_covariance(data, mean, sigma ** 2, n_components=1, radius=4).components
    rho0 = abs(spearmanr(posterior_coefficients(data, np.concatenate([mean[None], init]), sigma ** 2)[0][:, 0],
                         ts[labels]).correlation)
    res = fit_ppca(data, 1, mean_volume=mean, init_components=init, mask=mask, noise_psd=sigma ** 2,
                   n_iter=3, cg_iter=4, tol=0)
    rho = abs(spearmanr(res.mu[:, 0], ts[labels]).correlation)
    # the information limit of a linear model: coefficients under the true direction of motion
    tc = ts - ts.mean()
    x1 = np.tensordot(tc, vols, 1) / (tc ** 2).sum() * tc.std()
    oracle = abs(spearmanr(posterior_coefficients(data, np.stack([mean, x1]), sigma ** 2)[0][:, 0],
                           ts[labels]).correlation)
    assert rho > oracle - 0.04 and rho > 0.8, (rho, rho0, oracle)
    assert rho > rho0 - 0.03  # full-resolution EM does not lose the low-resolution start
    direction = (vols[-1] - vols[0]).ravel()
    assert abs(np.corrcoef(res.volumes[1].ravel(), direction)[0, 1]) > 0.8
    le = np.asarray(res.log_evidence)
    assert le[-1] > le[0]  # EM climbs the evidence
    assert res.mu.shape == (N, 1) and res.cov.shape == (N, 1, 1) and np.all(res.cov > 0)
