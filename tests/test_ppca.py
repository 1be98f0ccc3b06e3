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
    assert le.max() > le[0] and le[res.best_iteration] == le.max()  # EM climbs; the best iterate is kept
    assert res.mu.shape == (N, 1) and res.cov.shape == (N, 1, 1) and np.all(res.cov > 0)


def _scripted_em(monkeypatch, evidence):
    """fit_ppca with ppca_step / posterior_coefficients replaced by a script: the volumes
    after j M-steps are filled with j and have log evidence evidence[j]."""
    from types import SimpleNamespace

    import jaxhet.inference._linear as lin
    calls = dict(step=0, posterior=0)

    def step(data, state, **kw):
        calls["step"] += 1
        j = state.iteration
        n = state.mu.shape[0]
        return lin.PPCAState(np.full_like(state.volumes, j + 1), state.noise_psd, state.tau2,
                             np.full((n, 1), float(j), np.float32), state.cov,
                             list(state.log_evidence) + [evidence[j]], j + 1)

    def posterior(data, volumes, noise_psd, **kw):
        calls["posterior"] += 1
        n = 3
        return (np.full((n, 1), float(volumes[0].flat[0]), np.float32), np.ones((n, 1, 1), np.float32),
                np.full(n, evidence[int(volumes[0].flat[0])]))

    monkeypatch.setattr(lin, "ppca_step", step)
    monkeypatch.setattr(lin, "posterior_coefficients", posterior)
    state = lin.PPCAState(np.zeros((2, 2, 2, 2), np.float32), np.ones(2, np.float32), np.ones((2, 2), np.float32),
                          np.zeros((3, 1), np.float32), np.ones((3, 1, 1), np.float32), [], 0)
    return SimpleNamespace(box_size=2), state, calls


def test_ppca_early_stopping_keeps_the_best_iterate(monkeypatch):
    # evidence of the volumes after j M-steps: peaks at j = 2, then falls
    ev = [0.0, 1.0, 2.0, 1.5, 3.0, 4.0, 5.0, 6.0, 7.0]
    data, state, calls = _scripted_em(monkeypatch, ev)
    res = fit_ppca(data, 1, mask=np.ones((2, 2, 2), np.float32), state=state, n_iter=8, tol=0.0)
    # stops at the E-step that sees the decrease (step 4 evaluates the volumes after 3 steps)
    assert calls["step"] == 4 and res.stopped_early
    assert res.best_iteration == 2 and np.all(res.volumes[0] == 2.0)
    assert res.log_evidence == ev[:4]
    assert calls["posterior"] == 0 and np.all(res.mu == 2.0)  # the best iterate's own E-step posteriors
    # a tolerance stops on small improvements too: 0 -> 1 is below tol = 1.5
    data, state, calls = _scripted_em(monkeypatch, ev)
    res = fit_ppca(data, 1, mask=np.ones((2, 2, 2), np.float32), state=state, n_iter=8, tol=1.5)
    assert calls["step"] == 2 and res.best_iteration == 1 and res.stopped_early and np.all(res.volumes[0] == 1.0)
    # without early stopping every step runs and the last volumes are returned
    data, state, calls = _scripted_em(monkeypatch, ev)
    res = fit_ppca(data, 1, mask=np.ones((2, 2, 2), np.float32), state=state, n_iter=8, early_stop=False)
    assert calls["step"] == 8 and calls["posterior"] == 1 and not res.stopped_early
    assert res.best_iteration == 8 and np.all(res.volumes[0] == 8.0) and len(res.log_evidence) == 9


def test_ppca_runs_to_n_iter_while_evidence_climbs_and_keeps_the_best(monkeypatch):
    ev = [0.0, 1.0, 2.0, 3.0, 2.5]  # the last M-step's volumes (evaluated by the final pass) are worse
    data, state, calls = _scripted_em(monkeypatch, ev)
    res = fit_ppca(data, 1, mask=np.ones((2, 2, 2), np.float32), state=state, n_iter=4, tol=0.0)
    assert calls["step"] == 4 and calls["posterior"] == 1 and not res.stopped_early
    assert res.best_iteration == 3 and np.all(res.volumes[0] == 3.0) and res.log_evidence == ev
    assert np.all(res.mu == 3.0)
