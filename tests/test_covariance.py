"""Covariance from images (jaxhet.inference.estimate_covariance): the PCG solve satisfies
the covariance normal equations, and on a synthetic linear family the top principal
volume is the known direction of motion."""

from __future__ import annotations

import numpy as np

from jaxhet.inference import (CovarianceMoments, array_batches, estimate_covariance,
                              prepare_images, solve_covariance)
from jaxhet.inference._linear import _ball

from test_linear_helpers import atom_family, simulate


def test_covariance_pcg_solves_the_normal_equations(rng):
    """A tiny random problem: the PCG solution equals the dense least-squares solution."""
    ball, _, _ = _ball(1.0)
    n = len(ball)
    W = rng.uniform(0, 1, (40, n))
    H = W.T @ W
    U = rng.normal(size=(40, n)) + 1j * rng.normal(size=(40, n))
    # Hermitian-consistent B (covariance of a real map): B[-g,-g'] = conj B[g,g']
    B = U.T @ U.conj()
    mirror = np.array([np.nonzero((ball == -g).all(1))[0][0] for g in ball])
    B = 0.5 * (B + B[np.ix_(mirror, mirror)].conj())
    mom = CovarianceMoments(H.astype(np.float32), B.astype(np.complex64), ball, 1.0, 40)
    Dc = 6
    cm = np.zeros((Dc,) * 3, bool)
    cm[2:4, 2:4, 2:5] = True
    S, cg = solve_covariance(mom, cm, ridge=1e-2, tol=1e-6, max_iter=200)
    assert cg.converged
    # dense normal equations in the masked voxel basis
    f = np.arange(Dc) - Dc // 2
    zz, yy, xx = np.meshgrid(f, f, f, indexing="ij")
    pos = np.stack([xx[cm], yy[cm], zz[cm]], -1)
    gall = np.stack(np.meshgrid(f, f, f, indexing="ij")[::-1], -1).reshape(-1, 3)  # all cube frequencies (x,y,z)
    Fm = np.exp(-2j * np.pi * gall @ pos.T / Dc)
    gidx = [np.nonzero((gall == g).all(1))[0][0] for g in ball]
    lam = 1e-2 * H.max()
    K = np.full((Dc ** 3, Dc ** 3), lam)
    K[np.ix_(gidx, gidx)] += H
    Bt = np.zeros((Dc ** 3, Dc ** 3), complex)
    Bt[np.ix_(gidx, gidx)] = B
    m = len(pos)
    A = np.zeros((m * m, m * m))
    for j in range(m * m):
        E = np.zeros(m * m)
        E[j] = 1
        E = E.reshape(m, m)
        A[:, j] = np.real(Fm.conj().T @ (K * (Fm @ E @ Fm.conj().T)) @ Fm).ravel()
    rhs = np.real(Fm.conj().T @ Bt @ Fm).ravel()
    want = np.linalg.lstsq(A, rhs, rcond=None)[0].reshape(m, m)
    want = 0.5 * (want + want.T)
    np.testing.assert_allclose(S, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_covariance_recovers_the_principal_direction():
    D, a, N = 16, 5.0, 1500
    ts = np.linspace(-1, 1, 9)
    vols = atom_family(D, a, ts, n_atoms=24, n_moving=8, shift_in_angstroms=(6.0, 0.0, 0.0), seed=7)
    labels = np.random.default_rng(3).integers(0, len(ts), N)
    imgs, R, orig, ctf, sigma = simulate(vols, labels, a, seed=8, snr=1.0)
    data = prepare_images(lambda: array_batches(imgs, R, orig, ctf, a, 500), batch_size=128)
    mean = vols[labels].mean(0)
    res = estimate_covariance(data, mean, sigma ** 2, n_components=2, mask=None, radius=4)
    direction = vols[-1] - vols[0]
    c = abs(np.corrcoef(res.components[0].ravel(), direction.ravel())[0, 1])
    assert c > 0.9, c
    assert res.eigenvalues[0] > 3 * res.eigenvalues[1]
