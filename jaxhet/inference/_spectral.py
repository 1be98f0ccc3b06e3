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
           "kernel_weights", "interpolate_node_maps", "node_log_likelihoods", "node_reconstructions",
           "interpolated_log_likelihoods", "select_bandwidth", "node_posteriors"]


class DiffusionMap(NamedTuple):
    """Diffusion coordinates: coords [N, n] (psi_k scaled by lambda_k^t), eigenvalues [n],
    eps (kernel width), n_neighbors."""

    coords: np.ndarray
    eigenvalues: np.ndarray
    eps: float
    n_neighbors: int


def _diffusion_kernel(X, k: int, eps, alpha: float):
    """Dense density-normalised kNN Gaussian kernel on X [n, d]: (W~ [n, n], eps, q)."""
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
    dist, ind = nn.kneighbors(X)
    d2 = dist[:, 1:] ** 2
    if eps is None:  # self-tuning widths (Zelnik-Manor & Perona 2004): sigma_i = distance to the k-th neighbour
        sig = np.maximum(dist[:, -1], 1e-12)
        w = np.exp(-d2 / (sig[:, None] * sig[ind[:, 1:]]))
        eps = float(np.median(sig) ** 2)
    else:
        w = np.exp(-d2 / eps)
    W = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(n), k), ind[:, 1:].ravel())), shape=(n, n))
    W = W.maximum(W.T).toarray() + np.eye(n)
    q = W.sum(1)
    if alpha:
        W = W / np.outer(q ** alpha, q ** alpha)
    return W, eps, q


def diffusion_map(x, n_components: int = 2, *, n_neighbors: int = 32, eps: float | None = None,
                  alpha: float = 1.0, t: float = 1.0, n_landmarks: int = 1500, seed: int = 0,
                  debug: bool = False) -> DiffusionMap:
    """Diffusion-map embedding (Coifman & Lafon 2006) of points x [N, d].

    The eigenproblem is solved densely on at most ``n_landmarks`` points (a random
    subset); the other points get their coordinates by the Nystrom extension
    ``psi_j(x) = lambda_j^-1 sum_l M(x, l) psi_j(l)`` with M the (density-normalised,
    row-stochastic) kernel from x to the landmarks.

    Args:
        x: [N, d] points (e.g. posterior means of linear-model coefficients).
        n_components: number of non-trivial coordinates returned.
        n_neighbors: k of the k-NN kernel (doubled, up to 16 k, until the graph is not
            (nearly) disconnected: ``1 - lambda_1 > 0.02 (1 - lambda_2)``).
        eps: kernel width (squared distance); default: self-tuning widths
            ``exp(-d_ij^2 / (sigma_i sigma_j))`` with sigma_i the distance of point i to its
            k-th neighbour (Zelnik-Manor & Perona 2004), robust to sparse tails.
        alpha: density normalisation (1: Laplace-Beltrami; 0: graph Laplacian).
        t: diffusion time (coordinates scaled by lambda^t).
        n_landmarks: size of the subset solved exactly.
        seed: landmark subset.

    Returns:
        :class:`DiffusionMap`; the sign of each coordinate is fixed so that it correlates
        positively with the first column of x.
    """
    from scipy.sparse.csgraph import connected_components

    X = np.asarray(x, np.float64)
    if X.ndim == 1:
        X = X[:, None]
    N = len(X)
    rng = np.random.default_rng(seed)
    land = np.sort(rng.choice(N, n_landmarks, replace=False)) if N > n_landmarks else np.arange(N)
    L = X[land]
    n = len(L)
    k = int(min(max(n_neighbors, 2), n - 1))
    k_max = int(min(n - 1, max(16 * k, 256)))
    while True:
        W, e, q = _diffusion_kernel(L, k, eps, alpha)
        d = W.sum(1)
        S = W / np.sqrt(np.outer(d, d))
        import scipy.linalg
        top = min(n, max(n_components, 2) + 1)
        vals, vecs = scipy.linalg.eigh(S, subset_by_index=[n - top, n - 1], driver="evr")
        vals, vecs = vals[::-1], vecs[:, ::-1]
        gap1, gap2 = 1.0 - vals[1], 1.0 - vals[2] if n > 2 else 1.0
        connected = connected_components(W > 0, directed=False)[0] == 1
        # a nearly disconnected graph has 1 - lambda_1 << 1 - lambda_2 (on a connected 1D
        # manifold the ratio is ~1/4): psi_1 would indicate a component, not a coordinate
        if debug:
            print(f"diffusion_map: k={k} connected={connected} gaps {gap1:.3g} {gap2:.3g}")
        if (connected and gap1 > 0.02 * gap2) or k >= k_max:
            break
        k = min(2 * k, k_max)
    m = min(n_components, n - 1)
    if eps is None and len(land) < N:
        from sklearn.neighbors import NearestNeighbors
        sig_l = np.maximum(NearestNeighbors(n_neighbors=k + 1).fit(L).kneighbors(L)[0][:, -1], 1e-12)
    psi_l = vecs[:, 1:m + 1] / np.sqrt(d)[:, None]  # right eigenvectors of M = D^-1 W~
    lam = vals[1:m + 1]
    if len(land) < N:
        from sklearn.neighbors import NearestNeighbors
        kk = min(k, n)
        nn = NearestNeighbors(n_neighbors=kk).fit(L)
        dist, ind = nn.kneighbors(X)
        kx = np.exp(-dist ** 2 / (np.maximum(dist[:, -1:], 1e-12) * sig_l[ind])) if eps is None \
            else np.exp(-dist ** 2 / e)
        if alpha:
            qx = kx.sum(1) + 1e-300
            kx = kx / (qx[:, None] ** alpha * q[ind] ** alpha)
        mx = kx / kx.sum(1, keepdims=True)
        psi = np.einsum("nk,nkj->nj", mx, psi_l[ind]) / lam[None]
        psi[land] = psi_l
    else:
        psi = psi_l
    psi = psi / max(np.abs(psi).std(0).max(), 1e-30)
    coords = psi * (np.abs(lam) ** t)[None]
    for j in range(coords.shape[1]):
        c = np.corrcoef(coords[:, j], X[:, 0])[0, 1]
        if np.isfinite(c) and c < 0:
            coords[:, j] *= -1
    return DiffusionMap(coords.astype(np.float32), lam.astype(np.float32), float(e), k)


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
    seconds; node_posterior [N, J] (or None): posterior probability of each node given
    the image (:func:`node_posteriors`), for :meth:`posterior_map`.
    """

    node_maps: np.ndarray
    nodes: np.ndarray
    u: np.ndarray
    diffusion: DiffusionMap
    bandwidth: float
    n_effective: np.ndarray
    resolution_0143: np.ndarray
    seconds: float
    node_posterior: np.ndarray | None = None

    def map_of(self, u) -> np.ndarray:
        """Map(s) at manifold coordinate(s) u."""
        return interpolate_node_maps(self.node_maps, self.nodes, u)

    def posterior_map(self, i) -> np.ndarray:
        """Posterior-mean map of image(s) i: ``sum_j p(j | y_i) V_j`` (needs node_posterior)."""
        if self.node_posterior is None:
            raise ValueError("posterior_map: node_posterior was not computed (spectral_volumes(posterior=True))")
        return np.tensordot(np.asarray(self.node_posterior)[i], self.node_maps, 1).astype(np.float32)


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


def node_posteriors(log_likelihoods, log_prior=None) -> np.ndarray:
    """Posterior over nodes [N, J] from log-likelihoods [N, J] (and a log prior [N, J] or
    [J], default uniform): ``p(j | y_i) ∝ p(j) exp(ll_ij)``.

    With the node maps as a discrete sampling of the manifold, the posterior-mean map
    ``sum_j p(j | y_i) V_j`` is the minimum mean-square-error map of image i under that
    model (it averages over the uncertainty of the image's position instead of committing
    to a point estimate).
    """
    ll = np.asarray(log_likelihoods, np.float64)
    if log_prior is not None:
        ll = ll + np.asarray(log_prior, np.float64)
    p = np.exp(ll - ll.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def _interp_weights(nodes, u) -> np.ndarray:
    """[N, J] linear-interpolation weights of coordinates u between the nodes."""
    nodes = np.asarray(nodes, np.float64)
    u = np.clip(np.asarray(u, np.float64), nodes[0], nodes[-1])
    J = len(nodes)
    out = np.zeros((len(u), J), np.float32)
    if J == 1:
        out[:, 0] = 1
        return out
    j = np.clip(np.searchsorted(nodes, u) - 1, 0, J - 2)
    a = (u - nodes[j]) / np.maximum(nodes[j + 1] - nodes[j], 1e-12)
    out[np.arange(len(u)), j] = 1 - a
    out[np.arange(len(u)), j + 1] += a
    return out


def interpolated_log_likelihoods(prepared, node_maps, nodes, u, noise_psd, *, pad_factor: int = 2) -> np.ndarray:
    """Log-likelihood [N] of every image under the node maps interpolated at its u_i.

    ``-1/2 sum_k h(k) |y_i - c_i P_i sum_j a_ij V_j|^2`` (+ const), a_ij the linear
    interpolation weights; the slices of all node maps are taken in one pass.
    """
    import jax
    import jax.numpy as jnp

    from jaxhet.core._slicing import _trilinear_corners
    from ._linear import _coords, _gather, _grids, _noise_weights, linear_operators

    ops = linear_operators(prepared.box_size, prepared.fs, None, pad_factor)
    h = _noise_weights(ops, noise_psd)
    A = np.concatenate([_interp_weights(nodes, u), np.zeros((1, len(nodes)), np.float32)])  # row -1: padding
    A = jnp.asarray(A)
    grids = _grids(ops, jnp.asarray(np.asarray(node_maps, np.float32)))
    out = np.zeros(prepared.n_images)

    @jax.jit
    def ll_batch(batch):
        idx, w = _trilinear_corners(_coords(ops, batch.rotations), ops.padded_size)
        s = _gather(grids, idx, w)  # [B, K, J]
        model = jnp.einsum("bkj,bj->bk", s, A[batch.indices].astype(s.dtype))
        r = batch.y - batch.ctf * model
        return -0.5 * jnp.sum(h[None] * jnp.abs(r) ** 2, 1)

    for batch in prepared.batches():
        ll = np.asarray(ll_batch(batch))
        idx = np.asarray(batch.indices)
        keep = idx >= 0
        out[idx[keep]] = ll[keep]
    return out


def select_bandwidth(batches_fn, prepared, u, candidates=(0.05, 0.1, 0.2, 0.35), *, n_nodes: int = 15,
                     noise_psd=None, mask=None, seed: int = 0, **kw) -> tuple[float, dict]:
    """Kernel width by held-out likelihood: node maps from one half of the images, the
    log-likelihood of the other half under the maps interpolated at their coordinates.

    Returns ``(best bandwidth, {bandwidth: held-out mean log-likelihood per image})``.
    """
    from ._linear import noise_psd_from_residuals
    from ._reconstruct import random_half

    N = len(u)
    half = random_half(np.arange(N), seed)
    nodes = np.linspace(0.0, 1.0, int(n_nodes)).astype(np.float32)
    scores = {}
    for h in candidates:
        w = kernel_weights(u, nodes, h) * (half == 0)[:, None]
        maps, _ = node_reconstructions(batches_fn, w, mask=mask, **kw)
        if noise_psd is None:
            noise_psd = noise_psd_from_residuals(prepared, maps[len(maps) // 2])
        ll = interpolated_log_likelihoods(prepared, maps, nodes, u, noise_psd)
        scores[float(h)] = float(ll[half == 1].mean())
    best = max(scores, key=scores.get)
    return best, scores


def spectral_volumes(dataset_or_batches_fn, latents, *, n_nodes: int = 15, bandwidth: float | str = 0.2,
                     n_neighbors: int = 32, mask=None, batch_size: int = 256, pad_factor: int = 2,
                     ctf_sign: str = "relion", coordinate=None, min_weight: float = 1e-3, refine_iter: int = 0,
                     prepared=None, noise_psd=None, bandwidth_candidates=(0.05, 0.1, 0.2, 0.35),
                     posterior: bool = False, progress: bool = False) -> SpectralVolumes:
    """Diffusion-map embedding of per-image latents and kernel reconstructions along it.

    Args:
        dataset_or_batches_fn: a ``jaxhet.io.ParticleDataset`` or a zero-argument
            callable returning an iterable of batches (``jaxhet.inference.ImageBatch``
            fields, e.g. ``lambda: array_batches(...)``); batch ``indices`` index latents.
        latents: [N, K] per-image coordinates (e.g. PPCA posterior means).
        n_nodes: J nodes, evenly spaced on [0, 1] in the rank coordinate u.
        bandwidth: kernel width h in u units (fraction of the images), or ``"auto"``:
            chosen among ``bandwidth_candidates`` by held-out likelihood
            (:func:`select_bandwidth`; needs ``prepared`` or builds it).
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
        posterior: also compute every image's posterior over the final node maps
            (``node_posterior``, uniform prior; :meth:`SpectralVolumes.posterior_map`).
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

    def _prepared():
        from ._linear import prepare_images
        return prepared if prepared is not None else prepare_images(
            dataset_or_batches_fn if hasattr(dataset_or_batches_fn, "batches") else batches_fn,
            batch_size=batch_size, ctf_sign=ctf_sign)

    if isinstance(bandwidth, str):
        if bandwidth != "auto":
            raise ValueError(f"bandwidth must be a number or 'auto', got {bandwidth!r}")
        prepared = _prepared()
        bandwidth, scores = select_bandwidth(batches_fn, prepared, u, bandwidth_candidates, n_nodes=n_nodes,
                                             noise_psd=noise_psd, **kw)
        if progress:
            print(f"  bandwidth {bandwidth} (held-out log-likelihood per image: {scores})", flush=True)
    weights = kernel_weights(u, nodes, bandwidth)
    maps, res = node_reconstructions(batches_fn, weights, **kw)
    def _posterior(maps):
        nonlocal prepared, noise_psd
        from ._linear import noise_psd_from_residuals
        prepared = _prepared()
        if noise_psd is None:
            noise_psd = noise_psd_from_residuals(prepared, maps[len(maps) // 2])
        return node_posteriors(node_log_likelihoods(prepared, maps, noise_psd, pad_factor=pad_factor))

    for it in range(int(refine_iter)):
        u = manifold_coordinate(_posterior(maps) @ nodes)
        weights = kernel_weights(u, nodes, bandwidth)
        maps, res = node_reconstructions(batches_fn, weights, **kw)
        if progress:
            print(f"  refinement {it + 1}/{refine_iter} done", flush=True)
    post = _posterior(maps) if posterior else None
    return SpectralVolumes(maps, nodes, u, dm, float(bandwidth), weights.sum(0), res, time.time() - t0, post)
