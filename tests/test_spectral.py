"""Spectral volumes (jaxhet.inference._spectral): diffusion maps order a curved 1D manifold
that PCA cannot, node maps along the coordinate recover the states, and the node
likelihoods pick the right map."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from jaxhet.inference import (SpectralVolumes, array_batches, diffusion_map, interpolate_node_maps,
                              manifold_coordinate, node_log_likelihoods, node_posteriors, prepare_images,
                              spectral_volumes)

from test_linear_helpers import atom_family, simulate


def test_diffusion_map_orders_a_curved_manifold():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1.6 * np.pi, 800)
    x = np.stack([np.cos(t), np.sin(t), 0.1 * rng.normal(size=t.size)], 1) + 0.02 * rng.normal(size=(t.size, 3))
    dm = diffusion_map(x, 2, n_neighbors=20)
    rho = abs(spearmanr(dm.coords[:, 0], t).correlation)
    assert rho > 0.98, rho
    xc = x - x.mean(0)
    pc1 = xc @ np.linalg.svd(xc, full_matrices=False)[2][0]
    assert abs(spearmanr(pc1, t).correlation) < 0.9  # the first principal component folds the arc
    assert 0 < dm.eigenvalues[1] <= dm.eigenvalues[0] <= 1.0 + 1e-6


def test_manifold_coordinate_and_interpolation():
    u = manifold_coordinate(np.array([3.0, -1.0, 10.0, 0.5]))
    np.testing.assert_allclose(u, [2 / 3, 0.0, 1.0, 1 / 3], atol=1e-6)
    maps = np.stack([np.full((2, 2, 2), v, np.float32) for v in (0.0, 1.0, 4.0)])
    nodes = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(interpolate_node_maps(maps, nodes, 0.5), maps[1])
    np.testing.assert_allclose(interpolate_node_maps(maps, nodes, 0.75), np.full((2, 2, 2), 2.5), atol=1e-6)
    np.testing.assert_allclose(interpolate_node_maps(maps, nodes, [1.5])[0], maps[2])  # clamped


def test_node_posteriors_and_posterior_map():
    ll = np.array([[0.0, np.log(3.0), -np.inf], [1000.0, 1000.0, 1000.0 + np.log(2.0)]])
    p = node_posteriors(ll)
    np.testing.assert_allclose(p, [[0.25, 0.75, 0.0], [0.25, 0.25, 0.5]], atol=1e-6)
    np.testing.assert_allclose(node_posteriors(np.zeros((1, 2)), np.log([[0.2, 0.8]])), [[0.2, 0.8]], atol=1e-6)
    maps = np.stack([np.full((2, 2, 2), v, np.float32) for v in (0.0, 1.0, 4.0)])
    sv = SpectralVolumes(maps, np.array([0.0, 0.5, 1.0]), np.zeros(2), None, 0.1, np.ones(3), np.ones(3), 0.0, p)
    np.testing.assert_allclose(sv.posterior_map(0), np.full((2, 2, 2), 0.75), atol=1e-6)
    np.testing.assert_allclose(sv.posterior_map([0, 1])[1], np.full((2, 2, 2), 2.25), atol=1e-6)


def test_spectral_volumes_and_node_likelihoods():
    D, a, N = 12, 6.0, 800
    vols = atom_family(D, a, [-1.0, 1.0], n_atoms=20, n_moving=8, shift_in_angstroms=(7.0, 0.0, 0.0), seed=5)
    labels = np.arange(N) % 2
    imgs, R, orig, ctf, sigma = simulate(vols, labels, a, seed=6, snr=2.0)
    rng = np.random.default_rng(1)
    latent = labels + 0.3 * rng.normal(size=N)  # a noisy 1D coordinate
    fn = lambda: array_batches(imgs, R, orig, ctf, a, 200)  # noqa: E731
    sv = spectral_volumes(fn, latent[:, None], n_nodes=3, bandwidth=0.15, n_neighbors=15)
    assert abs(spearmanr(sv.u, labels).correlation) > 0.75
    c = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]  # noqa: E731
    ends = sv.node_maps[[0, -1]]
    if c(ends[0], vols[0]) < c(ends[0], vols[1]):  # the coordinate's sign is arbitrary
        ends = ends[::-1]
    assert c(ends[0], vols[0]) > c(ends[0], vols[1]) and c(ends[1], vols[1]) > c(ends[1], vols[0])
    # likelihoods of the true maps classify the images
    data = prepare_images(fn, batch_size=128)
    ll = node_log_likelihoods(data, vols, sigma ** 2)
    assert ll.shape == (N, 2) and np.mean(ll.argmax(1) == labels) > 0.95
