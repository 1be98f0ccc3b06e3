"""Helpers (no tests) for the linear-model tests (test_linear*, test_covariance*,
test_ppca*, test_spectral*): Gaussian-atom maps projected through jaxhet.core with CTFs
and shifts, optionally a family of maps V(t) and white noise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxhet.core import (CTFParams, VolumeFT, gaussian_atoms_volume, origin_to_shift, prepare_volume, project_volume,
                         random_rotations, render_image)


def atom_family(D: int, a: float, ts, n_atoms: int = 30, n_moving: int = 10, shift_in_angstroms=(5.0, 0.0, 0.0),
                seed: int = 0):
    """Maps [len(ts), D, D, D] of a random 'molecule' whose first n_moving atoms move by t * shift."""
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(n_atoms, 3)) * D * a * 0.07
    move = np.zeros((n_atoms, 3))
    move[:n_moving] = shift_in_angstroms
    return np.stack([np.asarray(gaussian_atoms_volume(jnp.asarray(pos + t * move, jnp.float32), jnp.ones(n_atoms),
                                                      1.2 * a, D, a)) for t in np.atleast_1d(ts)])


def simulate(vols, labels, a: float, seed: int = 0, snr: float | None = None, max_shift: float = 1.5):
    """Images [N, D, D] of maps vols[labels] with random poses, shifts, CTFs (+ noise at an SNR).

    Returns (images, rotations [N,3,3], origins [N,2] (RELION), ctf (CTFParams of [N]), sigma).
    """
    vols = np.asarray(vols)
    labels = np.asarray(labels)
    N, D = len(labels), vols.shape[-1]
    rng = np.random.default_rng(seed)
    R = np.asarray(random_rotations(jax.random.key(seed), N), np.float32)
    orig = rng.uniform(-max_shift, max_shift, (N, 2)).astype(np.float32)
    du = rng.uniform(8000, 20000, N).astype(np.float32)
    f = lambda v: np.full(N, v, np.float32)  # noqa: E731
    ctf = CTFParams(du, du - 150, rng.uniform(0, 180, N).astype(np.float32), f(300.0), f(2.7), f(0.1), f(0.0),
                    f(0.0))

    @jax.jit
    def render(spec, Rm, o, c):
        vft = VolumeFT(spec, D, 2)
        return jax.vmap(lambda r, oo, cc: render_image(project_volume(vft, r, origin_to_shift(oo), cc, a), D))(Rm, o, c)

    imgs = np.zeros((N, D, D), np.float32)
    for lab in np.unique(labels):
        idx = np.nonzero(labels == lab)[0]
        spec = prepare_volume(jnp.asarray(vols[lab])).spectrum
        imgs[idx] = np.asarray(render(spec, jnp.asarray(R[idx]), jnp.asarray(orig[idx]),
                                      CTFParams(*[jnp.asarray(x[idx]) for x in ctf])))
    sigma = 0.0
    if snr:
        sigma = float(np.sqrt(imgs.var() / snr))
        imgs = imgs + rng.normal(size=imgs.shape).astype(np.float32) * sigma
    return imgs, R, orig, ctf, sigma
