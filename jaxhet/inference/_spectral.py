"""Spectral volumes: a diffusion-map embedding of per-image latent coordinates and maps
reconstructed along the recovered manifold (survey ref. 30: Moscovich, Halevi, Andén &
Singer 2020, "Cryo-EM reconstruction of continuous heterogeneity by Laplacian spectral
volumes"; Coifman & Lafon 2006, diffusion maps).

Diffusion map. For points x_i (e.g. the posterior means of PPCA coefficients) a k-nearest
neighbour Gaussian kernel

    W_ij = exp(-||x_i - x_j||^2 / eps)       (j among the k neighbours of i, symmetrised)

is density-normalised (``alpha = 1`` gives the Laplace-Beltrami operator of the manifold,
independent of the sampling density): ``W~ = Q^-a W Q^-a`` with ``Q = diag(sum_j W_ij)``,
then row-normalised into the Markov matrix ``M = D^-1 W~``. Its top non-trivial
eigenvectors psi_1, psi_2, ... (computed from the symmetric ``D^-1/2 W~ D^-1/2``) are the
diffusion coordinates; psi_1 orders the points along a one-dimensional manifold.

Spectral volumes along the manifold. With ``u_i = rank(psi_1,i) / (N - 1)`` in [0, 1] and
nodes ``t_j`` on [0, 1], the map at node j is a kernel-weighted reconstruction

    V_j = argmin_V sum_i w_ij || y_i - C_i P_i V ||^2 + prior,   w_ij = exp(-(u_i - t_j)^2 / (2 h^2))

computed by the gold-standard direct Fourier inversion of :mod:`jaxhet.inference._reconstruct`
(weighted backprojection + FSC-based Wiener filter); the map of image i is the linear
interpolation of the node maps at u_i. (Moscovich et al. expand the maps in the graph
Laplacian's eigenvectors and fit the coefficients by least squares; kernel regression
along the first coordinate is the same fit with a local, not a global, basis, as in
RECOVAR's kernel regression, Gilles & Singer 2024.)
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

__all__ = ["DiffusionMap", "diffusion_map", "manifold_coordinate", "SpectralVolumes", "spectral_volumes",
           "kernel_weights", "interpolate_node_maps", "node_log_likelihoods", "node_reconstructions"]


class DiffusionMap(NamedTuple):
    """Diffusion coordinates: coords [N, n] (psi_k scaled by lambda_k^t), eigenvalues [n],
    eps (kernel width), n_neighbors."""

    coords: np.ndarray
    eigenvalues: np.ndarray
    eps: float
    n_neighbors: int


def diffusion_map(x, n_components: int = 2, *, n_neighbors: int = 32, eps: float | None = None,
                  alpha: float = 1.0, t: float = 1.0, seed: int = 0) -> DiffusionMap:
    """Diffusion-map embedding (Coifman & Lafon 2006) of points x [N, d].

    Args:
        x: [N, d] points (e.g. posterior means of linear-model coefficients).
        n_components: number of non-trivial coordinates returned.
        n_neighbors: k of the sparse k-NN kernel (doubled until the graph is connected and
            the second eigenvalue is below 1 - 1e-5, i.e. not nearly disconnected).
        eps: kernel width (squared distance); default the median squared distance to the
            k-th neighbour.
        alpha: density normalisation (1: Laplace-Beltrami; 0: graph Laplacian).
        t: diffusion time (coordinates scaled by lambda^t).
        seed: starting vector of the sparse eigensolver.

    Returns:
        :class:`DiffusionMap`; the sign of each coordinate is fixed so that it correlates
        positively with the first column of x.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh
    from sklearn.neighbors import NearestNeighbors

    from scipy.sparse.csgraph import connected_components

    X = np.asarray(x, np.float64)
    if X.ndim == 1:
        X = X[:, None]
    N = len(X)
    k = int(min(max(n_neighbors, 2), N - 1))
    rng = np.random.default_rng(seed)
    while True:
        nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
        dist, ind = nn.kneighbors(X)
        d2 = dist[:, 1:] ** 2
        e = eps
        if e is None:
            e = float(np.median(d2[:, -1]))
            e = e if e > 0 else 1.0
        rows = np.repeat(np.arange(N), k)
        W = sp.csr_matrix((np.exp(-d2.ravel() / e), (rows, ind[:, 1:].ravel())), shape=(N, N))
        W = W.maximum(W.T)
        connected = connected_components(W, directed=False)[0] == 1
        if connected or k >= N - 1:
            W = W + sp.identity(N, format="csr")
            q = np.asarray(W.sum(1)).ravel()
            if alpha:
                qa = sp.diags(q ** -alpha)
                W = qa @ W @ qa
            d = np.asarray(W.sum(1)).ravel()
            dm = sp.diags(d ** -0.5)
            S = dm @ W @ dm
            # shift-invert about 1, the top of the Markov spectrum
            vals, vecs = eigsh(S.tocsc(), k=n_components + 1, sigma=1.0 + 1e-3, which="LM", v0=rng.normal(size=N))
            order = np.argsort(vals)[::-1]
            vals, vecs = vals[order], vecs[:, order]
            # a (nearly) disconnected graph has a second eigenvalue ~1 and psi_1 indicates a
            # component, not a coordinate: grow the neighbourhoods
            if vals[1] < 1.0 - 1e-5 or k >= N - 1:
                break
        k = min(2 * k, N - 1)
    eps = e
    psi = vecs / np.sqrt(d)[:, None]
    psi = psi[:, 1:n_components + 1] / np.maximum(np.abs(psi[:, :1]).mean(), 1e-30)
    lam = vals[1:n_components + 1]
    coords = psi * (np.abs(lam) ** t)[None]
    for j in range(coords.shape[1]):
        c = np.corrcoef(coords[:, j], X[:, 0])[0, 1]
        if np.isfinite(c) and c < 0:
            coords[:, j] *= -1
    return DiffusionMap(coords.astype(np.float32), lam.astype(np.float32), float(eps), k)


def manifold_coordinate(coord) -> np.ndarray:
    """Rank-normalised coordinate u_i = rank_i / (N - 1) in [0, 1] (ties broken by order)."""
    c = np.asarray(coord).ravel()
    u = np.empty(len(c), np.float64)
    u[np.argsort(c, kind="stable")] = np.arange(len(c))
    return (u / max(len(c) - 1, 1)).astype(np.float32)


def kernel_weights(u, nodes, bandwidth: float) -> np.ndarray:
    """Gaussian kernel weights ``exp(-(u_i - t_j)^2 / (2 h^2))``, [N, J]."""
    u = np.asarray(u, np.float64)[:, None]
    t = np.asarray(nodes, np.float64)[None]
    return np.exp(-0.5 * ((u - t) / bandwidth) ** 2).astype(np.float32)


def interpolate_node_maps(node_maps, nodes, u) -> np.ndarray:
    """Linear interpolation of node maps [J, D, D, D] at coordinates u (scalar or [M])."""
    nodes = np.asarray(nodes, np.float64)
    maps = np.asarray(node_maps)
    us = np.atleast_1d(np.asarray(u, np.float64))
    out = []
    for x in us:
        x = float(np.clip(x, nodes[0], nodes[-1]))
        j = int(np.clip(np.searchsorted(nodes, x) - 1, 0, len(nodes) - 2)) if len(nodes) > 1 else 0
        if len(nodes) == 1:
            out.append(maps[0])
            continue
        a = (x - nodes[j]) / max(nodes[j + 1] - nodes[j], 1e-12)
        out.append((1 - a) * maps[j] + a * maps[j + 1])
    out = np.stack(out).astype(np.float32)
    return out if np.ndim(u) else out[0]


class SpectralVolumes(NamedTuple):
    """Maps along the manifold.

    node_maps [J, D, D, D]; nodes [J] (in u units); u [N] manifold coordinate of each image
    (dataset order); diffusion (:class:`DiffusionMap`); bandwidth; effective number of
    images per node [J]; resolution_0143 [J] (A, masked half-map FSC of each node);
    seconds.
    """

    node_maps: np.ndarray
    nodes: np.ndarray
    u: np.ndarray
    diffusion: DiffusionMap
    bandwidth: float
    n_effective: np.ndarray
    resolution_0143: np.ndarray
    seconds: float

    def map_of(self, u) -> np.ndarray:
        """Map(s) at manifold coordinate(s) u."""
        return interpolate_node_maps(self.node_maps, self.nodes, u)


def node_reconstructions(batches_fn, weights, *, mask=None, batch_size: int = 256, pad_factor: int = 2,
                         ctf_sign: str = "relion", min_weight: float = 1e-3, progress: bool = False):
    """Kernel-weighted known-pose reconstructions, one per column of ``weights`` [N, J].

    Each is the CTF-weighted direct Fourier inversion with gold-standard halves and the
    FSC-based Wiener filter of :mod:`jaxhet.inference._reconstruct` (weighted
    backprojection, images with weight < ``min_weight`` skipped).

    Returns:
        ``(maps [J, D, D, D], resolution_0143 [J])``.
    """
    import jax.numpy as jnp

    from jaxhet.core import CTFParams, origin_to_shift
    from ._reconstruct import backproject_images, finalize_reconstruction, init_reconstruction, random_half

    weights = np.asarray(weights, np.float32)
    maps, res = [], []
    for j in range(weights.shape[1]):
        wj = weights[:, j]
        state = None
        pix = None
        for b in batches_fn():
            idx = np.asarray(b.indices)
            w = wj[idx]
            keep = np.nonzero(w >= min_weight)[0]
            for s in range(0, len(keep), batch_size):
                sel = keep[s:s + batch_size]
                m = len(sel)
                pad = np.concatenate([sel, np.full(batch_size - m, sel[0])])
                iw = np.zeros(batch_size, np.float32)
                iw[:m] = w[sel]
                imgs = np.asarray(b.images, np.float32)[pad]
                if state is None:
                    state = init_reconstruction(imgs.shape[-1], pad_factor)
                c = None if b.ctf is None else CTFParams(*[np.asarray(x)[pad] for x in b.ctf])
                state = backproject_images(state, imgs, np.asarray(b.rotations, np.float32)[pad],
                                           origin_to_shift(jnp.asarray(np.asarray(b.origin_in_pixels, np.float32)[pad])),
                                           c, random_half(idx[pad]), float(b.pixel_size_in_angstroms), iw, ctf_sign)
                pix = float(b.pixel_size_in_angstroms)
        if state is None:
            raise ValueError(f"node {j}: no image has a kernel weight >= {min_weight}")
        fin = finalize_reconstruction(state, pix, mask=mask)
        maps.append(fin.volume if mask is None else fin.volume * np.asarray(mask, np.float32))
        res.append(fin.resolution_0143)
        if progress:
            print(f"  node {j + 1}/{weights.shape[1]}: {wj.sum():.0f} effective images, {fin.resolution_0143:.1f} A",
                  flush=True)
    return np.stack(maps).astype(np.float32), np.asarray(res, np.float32)


def node_log_likelihoods(prepared, node_maps, noise_psd, *, chunk: int = 4, pad_factor: int = 2) -> np.ndarray:
    """Gaussian log-likelihood of every image under every node map, [N, J] (dataset order).

    ``log p(y_i | V_j) = -1/2 sum_k h(k) |y_i(k) - c_i(k) [F V_j](p A_i^T k)|^2`` + const,
    with the forward operator and noise weights of :mod:`jaxhet.inference._linear`.

    Args:
        prepared: :class:`jaxhet.inference.PreparedImages`.
        node_maps: [J, D, D, D].
        noise_psd: scalar or [D//2+1] per-pixel noise variance.
        chunk: maps per jitted gather.
    """
    import jax
    import jax.numpy as jnp

    from jaxhet.core._slicing import _trilinear_corners
    from ._linear import _coords, _gather, _grids, _noise_weights, linear_operators

    ops = linear_operators(prepared.box_size, prepared.fs, None, pad_factor)
    h = _noise_weights(ops, noise_psd)
    maps = np.asarray(node_maps, np.float32)
    J = len(maps)
    out = np.zeros((prepared.n_images, J), np.float64)

    @jax.jit
    def ll_batch(grids, batch):
        idx, w = _trilinear_corners(_coords(ops, batch.rotations), ops.padded_size)
        s = _gather(grids, idx, w)  # [B, K, V]
        r = batch.y[..., None] - batch.ctf[..., None] * s
        return -0.5 * jnp.sum(h[None, :, None] * jnp.abs(r) ** 2, 1)

    for j0 in range(0, J, chunk):
        vols = maps[j0:j0 + chunk]
        grids = _grids(ops, jnp.asarray(vols))
        for batch in prepared.batches():
            ll = np.asarray(ll_batch(grids, batch))
            idx = np.asarray(batch.indices)
            keep = idx >= 0
            out[idx[keep], j0:j0 + len(vols)] = ll[keep]
    return out


def spectral_volumes(dataset_or_batches_fn, latents, *, n_nodes: int = 25, bandwidth: float = 0.04,
                     n_neighbors: int = 32, mask=None, batch_size: int = 256, pad_factor: int = 2,
                     ctf_sign: str = "relion", coordinate=None, min_weight: float = 1e-3, refine_iter: int = 0,
                     prepared=None, noise_psd=None, progress: bool = False) -> SpectralVolumes:
    """Diffusion-map embedding of per-image latents and kernel reconstructions along it.

    Args:
        dataset_or_batches_fn: a ``jaxhet.io.ParticleDataset`` or a zero-argument
            callable returning an iterable of batches (``jaxhet.inference.ImageBatch``
            fields, e.g. ``lambda: array_batches(...)``); batch ``indices`` index latents.
        latents: [N, K] per-image coordinates (e.g. PPCA posterior means).
        n_nodes: J nodes, evenly spaced on [0, 1] in the rank coordinate u.
        bandwidth: kernel width h in u units (fraction of the images).
        n_neighbors: k of the diffusion-map kernel.
        mask: optional [D, D, D] mask multiplied into the node maps.
        coordinate: optional [N] coordinate to use instead of the first diffusion
            coordinate (e.g. one latent component).
        min_weight: images with a kernel weight below this are skipped for a node.
        refine_iter: rounds of refinement of the coordinate: the posterior mean node
            position of every image under the node maps (uniform prior over nodes,
            :func:`node_log_likelihoods`), re-ranked, then new node maps.
        prepared: :class:`jaxhet.inference.PreparedImages` for the refinement (default
            built from the dataset); noise_psd: its noise (default from the residuals
            against the nearest node map).
        progress: print one line per node.

    Returns:
        :class:`SpectralVolumes`.
    """
    t0 = time.time()
    Z = np.asarray(latents, np.float32)
    if Z.ndim == 1:
        Z = Z[:, None]
    dm = diffusion_map(Z, n_components=min(2, max(1, len(Z) - 2)), n_neighbors=n_neighbors)
    coord = dm.coords[:, 0] if coordinate is None else np.asarray(coordinate)
    u = manifold_coordinate(coord)
    nodes = np.linspace(0.0, 1.0, int(n_nodes)).astype(np.float32)
    if hasattr(dataset_or_batches_fn, "batches"):
        ds = dataset_or_batches_fn
        batches_fn = lambda: ds.batches(batch_size, shuffle=False)  # noqa: E731
    else:
        batches_fn = dataset_or_batches_fn
    kw = dict(mask=mask, batch_size=batch_size, pad_factor=pad_factor, ctf_sign=ctf_sign, min_weight=min_weight,
              progress=progress)
    weights = kernel_weights(u, nodes, bandwidth)
    maps, res = node_reconstructions(batches_fn, weights, **kw)
    for it in range(int(refine_iter)):
        from ._linear import noise_psd_from_residuals, prepare_images
        if prepared is None:
            prepared = prepare_images(dataset_or_batches_fn if hasattr(dataset_or_batches_fn, "batches")
                                      else batches_fn, batch_size=batch_size, ctf_sign=ctf_sign)
        if noise_psd is None:
            noise_psd = noise_psd_from_residuals(prepared, maps[len(maps) // 2])
        ll = node_log_likelihoods(prepared, maps, noise_psd, pad_factor=pad_factor)
        p = np.exp(ll - ll.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        u = manifold_coordinate(p @ nodes)
        weights = kernel_weights(u, nodes, bandwidth)
        maps, res = node_reconstructions(batches_fn, weights, **kw)
        if progress:
            print(f"  refinement {it + 1}/{refine_iter} done", flush=True)
    return SpectralVolumes(maps, nodes, u, dm, float(bandwidth), weights.sum(0), res, time.time() - t0)
