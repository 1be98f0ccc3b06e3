"""Latent analysis: PCA, k-means, kNN-graph trajectories, landscapes, plots (analytic cases)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxhet import analysis as A


def test_pca_recovers_the_dominant_axis(rng):
    u = rng.normal(size=5)
    u /= np.linalg.norm(u)
    t = rng.normal(size=2000)
    z = t[:, None] * 3 * u + 0.05 * rng.normal(size=(2000, 5)) + 7.0
    r = A.pca(z)
    assert r.projections.shape == (2000, 5) and r.components.shape == (5, 5)
    assert abs(np.corrcoef(r.projections[:, 0], t)[0, 1]) > 0.999
    assert r.explained_variance_ratio[0] > 0.99 and np.isclose(r.explained_variance_ratio.sum(), 1.0)
    np.testing.assert_allclose(np.abs(r.components[0] @ u), 1.0, atol=1e-3)
    np.testing.assert_allclose(r.components @ r.components.T, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(r.mean, z.mean(0), rtol=1e-5)


def test_kmeans_finds_separated_clusters_and_snaps_centres_to_data(rng):
    centres = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0]], float)
    lab = rng.integers(0, 3, 600)
    z = centres[lab] + rng.normal(size=(600, 3))
    r = A.kmeans(z, 3)
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(lab, r.labels) == 1.0
    np.testing.assert_array_equal(r.on_data_centers, z[r.center_indices].astype(np.float32))
    # each centroid within ~0.2 of a true centre
    d = np.linalg.norm(r.centers[:, None] - centres[None], axis=-1).min(1)
    assert np.all(d < 0.3)


def test_graph_path_follows_the_data_not_the_chord(rng):
    th = np.sort(rng.uniform(0, np.pi, 1500))
    z = np.stack([np.cos(th), np.sin(th)], 1) * 5 + 0.02 * rng.normal(size=(1500, 2))
    tr = A.graph_path(z, np.array([5.0, 0.0]), np.array([-5.0, 0.0]), k=8)
    assert tr.indices[0] == np.argmin(np.linalg.norm(z - [5, 0], axis=1))
    assert tr.indices[-1] == np.argmin(np.linalg.norm(z - [-5, 0], axis=1))
    assert abs(tr.length - 5 * np.pi) / (5 * np.pi) < 0.06  # the arc (15.7), not the chord (10)
    r = np.linalg.norm(tr.latents, axis=1)
    assert np.all(np.abs(r - 5) < 0.2)
    pts = A.resample_path(tr.latents, 11)
    steps = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    assert pts.shape == (11, 2) and steps.std() / steps.mean() < 0.05
    np.testing.assert_allclose(pts[0], tr.latents[0], atol=1e-6)
    # two disconnected clouds
    z2 = np.concatenate([rng.normal(size=(50, 2)), 100 + rng.normal(size=(50, 2))])
    with pytest.raises(ValueError):
        A.graph_path(z2, 0, 99, k=5)


def test_landscape_minima_at_the_modes(rng):
    xy = np.concatenate([rng.normal([-3, 0], 0.5, (4000, 2)), rng.normal([3, 0], 0.5, (2000, 2))])
    land = A.latent_landscape(xy, bins=60)
    assert np.isclose(land.density.sum(), 1.0)
    xc = 0.5 * (land.x_edges[1:] + land.x_edges[:-1])
    yc = 0.5 * (land.y_edges[1:] + land.y_edges[:-1])
    i, j = np.unravel_index(np.argmin(land.energy), land.energy.shape)
    assert abs(xc[i] + 3) < 0.4 and abs(yc[j]) < 0.4 and land.energy[i, j] == 0
    e = lambda x, y: land.energy[np.argmin(abs(xc - x)), np.argmin(abs(yc - y))]
    # the minor mode is ~log(2) higher; the barrier between them much higher
    assert 0.3 < e(3, 0) < 1.2 and e(0, 0) > e(3, 0) + 3


def test_plots_write_pngs(tmp_path, rng):
    xy = rng.normal(size=(300, 2))
    A.plot_latents(xy, str(tmp_path / "a.png"), "t", points=xy[:3], trajectory=xy[:5])
    A.plot_latents(xy, str(tmp_path / "b.png"), "t", color=np.arange(300))
    A.plot_landscape(A.latent_landscape(xy), str(tmp_path / "c.png"), trajectory=xy[:4])
    for n in "abc":
        with open(tmp_path / f"{n}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.skipif(not A.HAVE_UMAP, reason="umap-learn not installed")
def test_umap_keeps_clusters_apart(rng):
    z = np.concatenate([rng.normal(size=(150, 6)), 20 + rng.normal(size=(150, 6))])
    e = A.umap_embedding(z)
    assert e.shape == (300, 2)
    assert np.linalg.norm(e[:150].mean(0) - e[150:].mean(0)) > 3 * max(e[:150].std(), e[150:].std())
