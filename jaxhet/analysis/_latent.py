"""Latent-space analysis (survey §9.4): PCA, UMAP, k-means, kNN-graph trajectories,
density landscapes, and their plots.

- PCA: ``z - mean = U S V^T``; projections ``(z - mean) V``, explained variance ``S^2 / sum S^2``.
- UMAP (McInnes et al. 2018) through ``umap-learn`` when installed (:data:`HAVE_UMAP`).
- k-means (scikit-learn, k-means++); as in cryoDRGN's ``analyze``, each centre is also
  snapped to the nearest *data* point (``center_indices``) so maps are made at latents
  that images actually occupy.
- Trajectories along the data (cryoDRGN ``graph_traversal``): a symmetric k-nearest
  neighbour graph with Euclidean edge lengths; the shortest path (Dijkstra) between the
  data points nearest to two latents stays on the populated manifold, unlike a straight
  line; :func:`resample_path` spaces n points evenly by arc length.
- Landscape: a Gaussian-smoothed 2D histogram of the latents on (PC1, PC2) as a
  density p, shown as the free-energy-like ``-log p`` (in units of kT, relative to its
  minimum; Ghoreishi-style "energy landscape" pictures).

References: Zhong et al. (2021) cryoDRGN ``analyze``; McInnes, Healy & Melville (2018)
UMAP; survey §9.4.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["HAVE_UMAP", "PCAResult", "pca", "umap_embedding", "KMeansResult", "kmeans", "knn_graph",
           "TrajectoryResult", "graph_path", "resample_path", "LandscapeResult", "latent_landscape",
           "plot_latents", "plot_landscape", "nearest_indices"]

import importlib.util as _ilu

# whether umap-learn is installed, without importing it (its import, with numba and
# scikit-learn, costs ~3 s, paid only by the functions that use it)
HAVE_UMAP = _ilu.find_spec("umap") is not None


class PCAResult(NamedTuple):
    projections: np.ndarray        # [N, n_components]
    components: np.ndarray         # [n_components, zdim] (rows: unit principal axes)
    explained_variance_ratio: np.ndarray
    mean: np.ndarray               # [zdim]


def pca(z, n_components: int | None = None) -> PCAResult:
    """Principal components of latents z [N, zdim] (sign fixed: largest |loading| positive)."""
    z = np.asarray(z, np.float64)
    mean = z.mean(0)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    k = vt.shape[0] if n_components is None else min(int(n_components), vt.shape[0])
    vt = vt[:k]
    sign = np.sign(vt[np.arange(k), np.argmax(np.abs(vt), 1)])
    vt = vt * sign[:, None]
    ev = s ** 2 / max(np.sum(s ** 2), 1e-300)
    return PCAResult(((z - mean) @ vt.T).astype(np.float32), vt.astype(np.float32), ev[:k], mean.astype(np.float32))


def umap_embedding(z, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """2D UMAP of z [N, zdim] (needs ``umap-learn``)."""
    if not HAVE_UMAP:
        raise ImportError("umap-learn is not installed (pip install umap-learn)")
    import umap
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed)
    return reducer.fit_transform(np.asarray(z, np.float32)).astype(np.float32)


class KMeansResult(NamedTuple):
    centers: np.ndarray            # [k, zdim] k-means centroids
    labels: np.ndarray             # [N]
    center_indices: np.ndarray     # [k] index of the data point nearest each centroid
    on_data_centers: np.ndarray    # [k, zdim] = z[center_indices]


def nearest_indices(z, points) -> np.ndarray:
    """Index of the row of z nearest each point [m, zdim]."""
    z = np.asarray(z, np.float64)
    p = np.atleast_2d(np.asarray(points, np.float64))
    d = ((p[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    return np.argmin(d, 1)


def kmeans(z, k: int, seed: int = 0) -> KMeansResult:
    """k-means (k-means++, 10 restarts) with centres also snapped onto the data."""
    from sklearn.cluster import KMeans
    z = np.asarray(z, np.float32)
    km = KMeans(n_clusters=int(k), n_init=10, random_state=seed).fit(z)
    idx = nearest_indices(z, km.cluster_centers_)
    return KMeansResult(km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64), idx, z[idx])


def knn_graph(z, k: int = 10):
    """Symmetric kNN graph (scipy CSR) with Euclidean edge lengths."""
    from sklearn.neighbors import NearestNeighbors
    z = np.asarray(z, np.float32)
    nn = NearestNeighbors(n_neighbors=min(int(k) + 1, len(z))).fit(z)
    g = nn.kneighbors_graph(z, mode="distance")
    return g.maximum(g.T).tocsr()


class TrajectoryResult(NamedTuple):
    indices: np.ndarray        # [m] data points along the shortest path (start ... end)
    latents: np.ndarray        # [m, zdim]
    arc_length: np.ndarray     # [m] cumulative path length
    length: float


def graph_path(z, start, end, k: int = 10) -> TrajectoryResult:
    """Shortest path on the kNN graph between the data points nearest ``start`` and ``end``.

    Args:
        z: [N, zdim] latents.
        start, end: latent points [zdim] (or data indices as ints).
        k: neighbours per point.

    Raises:
        ValueError: the two points are in different connected components (raise k).
    """
    from scipy.sparse.csgraph import dijkstra
    z = np.asarray(z, np.float32)
    i0 = int(start) if np.ndim(start) == 0 else int(nearest_indices(z, start)[0])
    i1 = int(end) if np.ndim(end) == 0 else int(nearest_indices(z, end)[0])
    g = knn_graph(z, k)
    dist, pred = dijkstra(g, directed=False, indices=i0, return_predecessors=True)
    if not np.isfinite(dist[i1]):
        raise ValueError(f"graph_path: points {i0} and {i1} are not connected in the {k}-NN graph; increase k")
    path = [i1]
    while path[-1] != i0:
        path.append(int(pred[path[-1]]))
    path = np.asarray(path[::-1], np.int64)
    lat = z[path]
    steps = np.linalg.norm(np.diff(lat, axis=0), axis=1) if len(path) > 1 else np.zeros(0)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    return TrajectoryResult(path, lat, arc, float(arc[-1]))


def resample_path(latents, n: int) -> np.ndarray:
    """n points evenly spaced by arc length along a polyline [m, zdim] (linear interpolation)."""
    lat = np.asarray(latents, np.float64)
    if len(lat) == 1:
        return np.repeat(lat, n, 0).astype(np.float32)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(lat, axis=0), axis=1))])
    t = np.linspace(0, arc[-1], int(n))
    out = np.stack([np.interp(t, arc, lat[:, j]) for j in range(lat.shape[1])], 1)
    return out.astype(np.float32)


class LandscapeResult(NamedTuple):
    x_edges: np.ndarray
    y_edges: np.ndarray
    density: np.ndarray      # [nx, ny] probability per bin (sums to 1)
    energy: np.ndarray       # [nx, ny] -log density - min (kT); inf where empty after smoothing


def latent_landscape(xy, bins: int = 80, smooth_bins: float = 1.5, extent=None) -> LandscapeResult:
    """Density of 2D points (e.g. PC1/PC2) and its -log as an energy landscape.

    Args:
        xy: [N, 2].
        bins: histogram bins per axis.
        smooth_bins: Gaussian smoothing width in bins (0 = none).
        extent: ((xmin, xmax), (ymin, ymax)); default the data range padded by 5 %.
    """
    from scipy.ndimage import gaussian_filter
    xy = np.asarray(xy, np.float64)
    if extent is None:
        lo, hi = xy.min(0), xy.max(0)
        pad = 0.05 * (hi - lo + 1e-12)
        extent = ((lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1]))
    h, xe, ye = np.histogram2d(xy[:, 0], xy[:, 1], bins=bins, range=extent)
    if smooth_bins > 0:
        h = gaussian_filter(h, smooth_bins)
    p = h / max(h.sum(), 1e-300)
    with np.errstate(divide="ignore"):
        e = -np.log(p)
    e = e - np.min(e[np.isfinite(e)])
    return LandscapeResult(xe, ye, p, e)


def plot_latents(xy, path: str, title: str = "", color=None, color_label: str = "", xlabel: str = "PC1",
                 ylabel: str = "PC2", points=None, point_labels=None, trajectory=None) -> None:
    """Scatter (hexbin density when uncoloured) of 2D latents to a PNG, with optional
    marked points (e.g. k-means centres) and a trajectory polyline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xy = np.asarray(xy)
    fig, ax = plt.subplots(figsize=(5.5, 4.6), dpi=110)
    if color is None:
        hb = ax.hexbin(xy[:, 0], xy[:, 1], gridsize=60, bins="log", cmap="viridis", mincnt=1)
        fig.colorbar(hb, ax=ax, label="count (log)")
    else:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=color, s=2, cmap="viridis", alpha=0.7, rasterized=True)
        fig.colorbar(sc, ax=ax, label=color_label)
    if trajectory is not None:
        t = np.asarray(trajectory)
        ax.plot(t[:, 0], t[:, 1], "-o", color="red", ms=3, lw=1.5, label="trajectory")
    if points is not None:
        pts = np.asarray(points)
        ax.scatter(pts[:, 0], pts[:, 1], c="black", marker="x", s=40, label="k-means")
        for i, p in enumerate(pts):
            ax.annotate(str(point_labels[i] if point_labels is not None else i), p, fontsize=8,
                        xytext=(3, 3), textcoords="offset points")
    if trajectory is not None or points is not None:
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_landscape(land: LandscapeResult, path: str, title: str = "latent energy landscape",
                   trajectory=None, vmax: float | None = None) -> None:
    """-log density on (PC1, PC2) as a filled contour PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    e = np.array(land.energy)
    finite = np.isfinite(e)
    vmax = float(np.percentile(e[finite], 95)) if vmax is None else vmax
    e = np.where(finite, np.minimum(e, vmax), vmax)
    xc = 0.5 * (land.x_edges[1:] + land.x_edges[:-1])
    yc = 0.5 * (land.y_edges[1:] + land.y_edges[:-1])
    fig, ax = plt.subplots(figsize=(5.5, 4.6), dpi=110)
    cs = ax.contourf(xc, yc, e.T, levels=20, cmap="magma_r")
    fig.colorbar(cs, ax=ax, label="-log density (kT)")
    if trajectory is not None:
        t = np.asarray(trajectory)
        ax.plot(t[:, 0], t[:, 1], "-o", color="cyan", ms=3, lw=1.5, label="trajectory")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
