"""Linear hyper-molecules from images with known poses: the mean map by conjugate gradients,
the covariance of the conformations directly from 2D images, and probabilistic PCA by EM
(survey §5, eq. 5-6).

Forward model (survey eq. 1) of image i at half-plane frequency k (cycles per box)

    y_i(k) = c_i(k) T_i(k) [F V](p A_i^T k) + n_i(k),     F V = FFT_P(pad_P(m V / s))

with ``c_i`` the CTF, ``T_i`` the shift phase, ``A_i`` the orientation, ``p = P / D`` the
Fourier padding, ``m`` a real-space support (solvent) mask, ``s`` the sinc^2 gridding
correction of trilinear interpolation and [.](g) trilinear interpolation of the padded
spectrum (:func:`jaxhet.core.gather_trilinear`). Noise is Gaussian with a radial power
spectrum (per-pixel variance units): ``E|n(k)|^2 = D^2 PSD(|k|)``. With the Parseval
half-plane weights ``hp(k)`` (1 or 2) every datum carries the precision

    h(k) = hp(k) / (D^2 PSD(|k|))

so that sums over the half plane equal real-space sums over pixels / sigma^2.

Mean (regularised least squares). The map minimises

    1/2 sum_i w_i sum_k h(k) |c_i T_i [F V](p A_i^T k) - y_i(k)|^2 + 1/2 sum_g |V^(g)|^2 / tau^2(|g|)

(V^ the DFT of the map on the D grid). Its normal equations ``(S + R) V = b`` with
``S = Re F^H G^H diag(sum_i w_i h c_i^2) G F`` (``G`` the trilinear slicing operator, ``G^H``
its exact adjoint, insertion/backprojection) and ``b = Re F^H G^H sum_i w_i h c_i conj(T_i) y_i``
are solved by preconditioned conjugate gradients, the operator applied matrix-free by
slicing and inserting (one pass over the images per iteration, streamed in batches). The
preconditioner is the Fourier-diagonal ("lumped") approximation of ``S`` used by direct
Fourier inversion (RELION): the backprojected CTF^2 weights.

Covariance (Katsevich, Kogan & Singer 2015; Andén & Singer 2018). With the residuals
``r_i = y_i - c_i T_i P_i mu`` the least-squares covariance estimator minimises

    sum_i || W_i^(1/2) (r_i r_i^H - N_i - P_i Sigma P_i^H) W_i^(1/2) ||_F^2

(N_i the noise covariance, W_i = N_i^-1 whitening). It is computed on a low-resolution
grid: the Fourier coefficients of the map on integer frequencies g of a ball |g| <= R + 1
(R the cut-off, cycles per box), nearest-neighbour discretisation of the slices, and the
covariance expressed in the voxel basis of a D_c^3 grid (D_c = 2 (R + 2)) restricted to a
solvent mask: ``Sigma_F = E S E^H`` with ``E[g, v] = exp(-2 pi i g . r_v / D_c)``. The
normal equations

    Re E^H (H o (E S E^H)) E + lambda S = Re E^H B E,
    H = sum_i w_i w_i^T,   B = sum_i u_i u_i^H - diag(sum_i w_i)

(``w_i(g) = sum_{k -> g} h c_i^2``, ``u_i(g) = sum_{k -> g} h c_i conj(T_i) r_i``, o the
entrywise product) are solved by preconditioned CG; the top K eigenvectors of S are the
principal volumes (upsampled to the data's box by Fourier padding).

Probabilistic PCA (Tagare, Kucukelbir, Sigworth, Wang & Rao 2015; Punjani & Fleet 2021,
cryoSPARC 3D variability). ``V_i = X_0 + sum_k b_ik X_k``, ``b_i ~ N(0, I_K)``. E-step: with
``a_ik = c_i [F X_k](p A_i^T k)`` and the residual ``r_i = conj(T_i) y_i - c_i [F X_0]``

    Lambda_i = I + Re A_i^H diag(h) A_i,   mu_i = Lambda_i^-1 Re A_i^H diag(h) r_i,
    Cov(b_i | y_i) = Lambda_i^-1.

M-step: with ``z_i = (1, b_i)`` and ``M_i = E[z_i z_i^T]`` the volumes ``Z = (X_0, .., X_K)``
(each restricted to the solvent mask) solve the coupled normal equations

    sum_l Re F^H G^H sum_i h c_i^2 (M_i)_{jl} G F Z_l + R_j Z_j = Re F^H G^H sum_i h c_i conj(T_i) y_i E[z_ij]

by block-preconditioned CG, and the noise spectrum is re-estimated from the expected
residuals. At the end the components are rotated to principal axes (orthogonal maps,
decorrelated coefficients ordered by variance).

References: Katsevich, Kogan & Singer (2015) SIAM J. Imaging Sci. 8:126; Andén & Singer
(2018) SIAM J. Imaging Sci. 11:1441; Tagare et al. (2015) J. Struct. Biol. 191:245;
Punjani & Fleet (2021) J. Struct. Biol. 213:107702; Gilles & Singer (2024) RECOVAR;
Hestenes & Stiefel (1952) (CG).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex, Float

from jaxhet.core import CTFParams, ctf as ctf_fn, fft3_centered, ifft3_centered, origin_to_shift, rfft2_centered, \
    shift_phase
from jaxhet.core._fourier import pad_volume
from jaxhet.core._slicing import _sinc2_correction, _trilinear_corners
from ._reconstruct import FrequencySet, frequency_set

__all__ = [
    "SliceBatch", "PreparedImages", "prepare_images", "LinearOperators", "linear_operators",
    "conjugate_gradient", "CGResult", "mean_normal_operator",
    "noise_psd_from_residuals", "shell_power", "MeanResult", "solve_mean", "default_mask",
    "CovarianceMoments", "covariance_moments", "solve_covariance", "CovarianceResult", "estimate_covariance",
    "PPCAState", "PPCAResult", "init_ppca", "ppca_step", "fit_ppca", "save_ppca_checkpoint",
    "load_ppca_checkpoint", "posterior_coefficients", "rotate_to_principal_axes", "linear_movie",
]


# ======================================================================================
# data: prepared batches
# ======================================================================================

class SliceBatch(NamedTuple):
    """One batch of images reduced to what the linear models need (jnp arrays).

    Attributes:
        y: [B, K] complex64 image DFT at the half-plane frequencies of the
            :class:`~jaxhet.inference.FrequencySet`, with the image shift undone
            (``conj(T_i) y_i``).
        ctf: [B, K] float32 CTF values.
        rotations: [B, 3, 3] RELION matrices A.
        image_weight: [B] float32 (0 marks padding).
        indices: [B] int32 dataset index (-1 for padding).
    """

    y: Complex[Array, "b k"]
    ctf: Float[Array, "b k"]
    rotations: Float[Array, "b 3 3"]
    image_weight: Float[Array, "b"]
    indices: Array


@partial(jax.jit, static_argnames=("box_size", "ctf_sign", "use_ctf"))
def _prepare_jit(images, rotations, shifts, ctf_params, freqs, flat_index, pixel_size, box_size, ctf_sign, use_ctf):
    f = rfft2_centered(images)
    y = f.reshape(f.shape[0], -1)[:, flat_index]
    ph = jax.vmap(lambda s: shift_phase(freqs, s, box_size))(shifts)
    y = y * jnp.conj(ph)
    k = freqs / (box_size * pixel_size)
    if use_ctf:
        c = jax.vmap(lambda p: ctf_fn(p, k, ctf_sign))(ctf_params)
    else:
        c = jnp.ones(y.shape, jnp.float32)
    return y.astype(jnp.complex64), c.astype(jnp.float32)


def _pad_rows(x, n):
    x = np.asarray(x)
    if len(x) == n:
        return x
    return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)], 0)


class PreparedImages:
    """A re-iterable set of :class:`SliceBatch` es (fixed batch size, padded).

    Built by :func:`prepare_images`. With ``cache=True`` the prepared batches stay in
    memory (``N * K * 12`` bytes: 50 MB for 10^4 images at D = 32); otherwise each pass
    re-reads the source (a ``ParticleDataset`` streams from disk).

    Attributes:
        n_images, box_size (image box D), pixel_size (A), batch_size, fs (the
        :class:`FrequencySet`), ctf_sign.
    """

    def __init__(self, source_fn: Callable[[], Iterable], n_images: int, box_size: int, pixel_size: float,
                 batch_size: int, fs: FrequencySet, ctf_sign: str, cache: bool):
        self._source_fn = source_fn
        self.n_images = int(n_images)
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self.batch_size = int(batch_size)
        self.fs = fs
        self.ctf_sign = ctf_sign
        self._cache = None
        if cache:
            self._cache = list(self._generate())

    def _generate(self):
        fs, B = self.fs, self.batch_size
        freqs, flat = jnp.asarray(fs.freqs), jnp.asarray(fs.flat_index)
        for b in self._source_fn():
            n = len(b.images)
            for s in range(0, n, B):
                e = min(n, s + B)
                m = e - s
                use_ctf = b.ctf is not None
                cp = CTFParams(*[jnp.asarray(_pad_rows(np.asarray(x)[s:e], B), jnp.float32) for x in b.ctf]) \
                    if use_ctf else CTFParams.create(jnp.zeros(B))
                shifts = origin_to_shift(jnp.asarray(_pad_rows(np.asarray(b.origin_in_pixels, np.float32)[s:e], B)))
                imgs = jnp.asarray(_pad_rows(np.asarray(b.images, np.float32)[s:e], B))
                rots = jnp.asarray(_pad_rows(np.asarray(b.rotations, np.float32)[s:e], B))
                y, c = _prepare_jit(imgs, rots, shifts, cp, freqs, flat, jnp.float32(b.pixel_size_in_angstroms),
                                    self.box_size, self.ctf_sign, use_ctf)
                w = np.zeros(B, np.float32)
                w[:m] = 1.0
                idx = np.full(B, -1, np.int32)
                idx[:m] = np.asarray(b.indices)[s:e]
                yield SliceBatch(y, c, rots, jnp.asarray(w), jnp.asarray(idx))

    def batches(self) -> Iterable[SliceBatch]:
        """One pass over the images."""
        if self._cache is not None:
            return iter(self._cache)
        return self._generate()

    def __len__(self) -> int:
        return self.n_images


def prepare_images(source, box_size: int | None = None, pixel_size: float | None = None, *,
                   batch_size: int = 512, max_radius: float | None = None, ctf_sign: str = "relion",
                   cache: bool = True, n_images: int | None = None) -> PreparedImages:
    """Wrap particles for the linear-model algorithms.

    Args:
        source: a ``jaxhet.io.ParticleDataset`` (anything with ``batches(batch_size)``
            and ``len``), or a zero-argument callable returning an iterable of batches with
            the fields of :class:`jaxhet.inference.ImageBatch` (e.g.
            ``lambda: array_batches(...)``).
        box_size, pixel_size: of the images (default: read from the first batch).
        batch_size: images per jitted step.
        max_radius: use frequencies |k| <= max_radius (cycles per box; default Nyquist).
        ctf_sign: "relion" or "cryodrgn".
        cache: keep the prepared batches in memory.
        n_images: number of images (default: counted).

    Returns:
        :class:`PreparedImages`.
    """
    if hasattr(source, "batches"):
        ds = source
        source_fn = lambda: ds.batches(batch_size, shuffle=False)  # noqa: E731
        n_images = len(ds) if n_images is None else n_images
    elif callable(source):
        source_fn = source
    else:
        raise TypeError("prepare_images: source must be a ParticleDataset or a callable returning batches")
    if box_size is None or pixel_size is None or n_images is None:
        first = None
        count = 0
        for b in source_fn():
            if first is None:
                first = b
            count += len(b.images)
            if n_images is not None:
                break
        if first is None:
            raise ValueError("prepare_images: no images")
        box_size = box_size or int(np.asarray(first.images).shape[-1])
        pixel_size = pixel_size or float(first.pixel_size_in_angstroms)
        n_images = n_images if n_images is not None else count
    fs = frequency_set(int(box_size), max_radius)
    return PreparedImages(source_fn, n_images, box_size, pixel_size, batch_size, fs, ctf_sign, cache)


# ======================================================================================
# operators
# ======================================================================================

class LinearOperators(NamedTuple):
    """Static geometry of the forward operator for D-box maps (numpy/jnp constants).

    Attributes:
        box_size: D. pad_factor: p. padded_size: P = p D.
        mask: [D, D, D] real-space support of the maps (1 = no mask).
        sinc2: [D, D, D] trilinear apodisation (gridding correction divides by it).
        freqs: [K, 2] half-plane frequencies (cycles per box). hp: [K] Parseval weights.
        radius: [K] integer radius of each frequency.
    """

    box_size: int
    pad_factor: int
    padded_size: int
    mask: Array
    sinc2: Array
    freqs: Array
    hp: Array
    radius: Array


jax.tree_util.register_pytree_node(
    LinearOperators,
    lambda o: ((o.mask, o.sinc2, o.freqs, o.hp, o.radius), (o.box_size, o.pad_factor, o.padded_size)),
    lambda aux, ch: LinearOperators(aux[0], aux[1], aux[2], *ch))


def linear_operators(box_size: int, fs: FrequencySet, mask=None, pad_factor: int = 2) -> LinearOperators:
    """Build :class:`LinearOperators` for D-box maps and the frequencies of ``fs``."""
    D = int(box_size)
    P = int(pad_factor) * D
    m = jnp.ones((D, D, D), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    return LinearOperators(D, int(pad_factor), P, m, jnp.asarray(_sinc2_correction(D, P)),
                           jnp.asarray(fs.freqs), jnp.asarray(2.0 * fs.half_weight), jnp.asarray(fs.radius))


def _to_grid(ops: LinearOperators, v):
    """F V: masked, gridding-corrected, padded spectrum [P, P, P] of one real map."""
    x = v * ops.mask / ops.sinc2
    return fft3_centered(pad_volume(x, ops.padded_size))


def _from_grid(ops: LinearOperators, g):
    """Re F^H G: exact real adjoint of :func:`_to_grid`."""
    P, D = ops.padded_size, ops.box_size
    x = ifft3_centered(g) * (P ** 3)
    s = slice(P // 2 - D // 2, P // 2 - D // 2 + D)
    return (x[s, s, s].real * ops.mask / ops.sinc2).astype(jnp.float32)


def _coords(ops: LinearOperators, rotations):
    """Padded-grid coordinates p A^T (kx, ky, 0) of every sample, [B, K, 3]."""
    return jnp.einsum("kj,bjl->bkl", ops.freqs, rotations[:, :2, :]) * ops.pad_factor


def _gather(grids_flat, idx, w):
    """Trilinear samples of V grids: grids_flat [P^3, V], idx/w [B, K, 8] -> [B, K, V]."""
    vals = jnp.take(grids_flat, idx, axis=0)  # [B, K, 8, V]
    return jnp.einsum("bkcv,bkc->bkv", vals, w.astype(jnp.float32))


def _scatter(values, idx, w, size):
    """Adjoint of :func:`_gather`: values [B, K, V] -> grids_flat [P^3, V]."""
    contrib = values[:, :, None, :] * w[..., None].astype(jnp.float32)  # [B, K, 8, V]
    V = values.shape[-1]
    out = jnp.zeros((size, V), values.dtype)
    return out.at[idx.reshape(-1)].add(contrib.reshape(-1, V))


def _grids(ops, vols):
    """[V, D, D, D] real -> [P^3, V] complex."""
    g = jax.vmap(lambda v: _to_grid(ops, v))(vols)
    return g.reshape(g.shape[0], -1).T


def _vols(ops, grids_flat):
    """[P^3, V] complex -> [V, D, D, D] real (adjoint)."""
    P = ops.padded_size
    g = grids_flat.T.reshape(-1, P, P, P)
    return jax.vmap(lambda x: _from_grid(ops, x))(g)


def shell_power(volume, n_shells: int | None = None) -> np.ndarray:
    """Mean |V^(g)|^2 over integer-radius shells of a map's centred DFT, [D//2 + 1]."""
    v = np.asarray(volume, np.float64)
    D = v.shape[-1]
    f = np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(v)))) ** 2
    r = _shell_index(D)
    n = D // 2 + 1 if n_shells is None else n_shells
    rr = np.minimum(r, n - 1).ravel()
    return np.bincount(rr, f.ravel(), minlength=n) / np.maximum(np.bincount(rr, minlength=n), 1)


def _shell_index(D: int) -> np.ndarray:
    f = np.arange(D) - D // 2
    return np.round(np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)).astype(np.int64)


def _fourier_prior(ops: LinearOperators, inv_tau2_shells, outside: float | None = None) -> Array:
    """[D, D, D] centred-DFT grid of 1/tau^2(|g|).

    Shells beyond the array take its last value; frequencies beyond Nyquist (|g| > D/2,
    the cube's corners, where no image samples exist) take ``outside`` when given (a
    strong prior keeps these unobserved directions at zero instead of leaving the normal
    equations singular there).
    """
    D = ops.box_size
    r = _shell_index(D)
    t = np.asarray(inv_tau2_shells, np.float64)
    g = t[np.minimum(r, len(t) - 1)]
    if outside is not None:
        f = np.arange(D) - D // 2
        rr = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
        g = np.where(rr > D / 2 + 0.5, max(float(outside), 0.0), g)
    return jnp.asarray(g, jnp.float32)


def _lumped_shell_mean(ops: LinearOperators, lumped_grid_flat) -> np.ndarray:
    """Mean over D-grid shells of the (symmetrised) lumped weight, in the prior's units.

    The data term of the normal equations acts on the D-grid DFT value at g roughly as
    ``P^3 W_sym(p g) / (2 D^3)`` relative to the prior term ``1/tau^2`` (see
    :func:`_lumped_preconditioner`); this returns that quantity averaged per shell [D//2+1].
    """
    D, P, p = ops.box_size, ops.padded_size, ops.pad_factor
    w = np.asarray(jnp.real(lumped_grid_flat).reshape(P, P, P), np.float64)
    w = w + np.roll(np.flip(w, (0, 1, 2)), 1, (0, 1, 2))
    f = np.arange(P) - P // 2
    r = np.round(np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2) / p).astype(np.int64)
    n = D // 2 + 1
    rr = np.minimum(r, n - 1).ravel()
    mean_w = np.bincount(rr, w.ravel(), minlength=n) / np.maximum(np.bincount(rr, minlength=n), 1)
    return 0.5 * (P ** 3) * mean_w / D ** 3


def _apply_prior(ops: LinearOperators, prior_grid, v):
    """Re FFT_D^H diag(prior) FFT_D v (the gradient of 1/2 sum |V^|^2 / tau^2)."""
    D = ops.box_size
    return (ifft3_centered(fft3_centered(v) * prior_grid).real * D ** 3).astype(jnp.float32)


# ======================================================================================
# conjugate gradients
# ======================================================================================

class CGResult(NamedTuple):
    """Solution of a CG solve and its convergence record.

    x: the solution (pytree like b). n_iter: iterations run. residual_norms: [n_iter + 1]
    ``||b - A x_j|| / ||b||``. converged: reached ``tol``.
    """

    x: object
    n_iter: int
    residual_norms: np.ndarray
    converged: bool


def _tdot(a, b):
    return sum(jnp.vdot(x, y).real for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _tlin(a, x, b, y):
    return jax.tree_util.tree_map(lambda u, v: a * u + b * v, x, y)


def conjugate_gradient(apply_a: Callable, b, x0=None, precondition: Callable | None = None, tol: float = 1e-4,
                       max_iter: int = 50, callback: Callable | None = None) -> CGResult:
    """Preconditioned conjugate gradients for a symmetric positive (semi)definite operator.

    Runs in Python (each ``apply_a`` may stream over the data set); vectors are pytrees.

    Args:
        apply_a: x -> A x.
        b: right-hand side.
        x0: initial guess (default zeros).
        precondition: r -> M^-1 r (symmetric positive definite), or None.
        tol: stop when ``||b - A x|| <= tol ||b||``.
        max_iter: iteration cap.
        callback: called as ``callback(j, x, relative_residual)`` after each iteration.

    Returns:
        :class:`CGResult`.
    """
    bnorm = float(jnp.sqrt(_tdot(b, b)))
    if x0 is None:
        x = jax.tree_util.tree_map(jnp.zeros_like, b)
        r = b
    else:
        x = x0
        r = _tlin(1.0, b, -1.0, apply_a(x0))
    if bnorm == 0:
        return CGResult(x, 0, np.zeros(1), True)
    z = precondition(r) if precondition is not None else r
    p = z
    rz = _tdot(r, z)
    hist = [float(jnp.sqrt(_tdot(r, r))) / bnorm]
    j = 0
    while hist[-1] > tol and j < max_iter:
        ap = apply_a(p)
        pap = _tdot(p, ap)
        if float(pap) <= 0:
            break
        alpha = rz / pap
        x = _tlin(1.0, x, alpha, p)
        r = _tlin(1.0, r, -alpha, ap)
        z = precondition(r) if precondition is not None else r
        rz_new = _tdot(r, z)
        p = _tlin(1.0, z, rz_new / rz, p)
        rz = rz_new
        j += 1
        hist.append(float(jnp.sqrt(_tdot(r, r))) / bnorm)
        if callback is not None:
            callback(j, x, hist[-1])
    return CGResult(x, j, np.asarray(hist), hist[-1] <= tol)


# ======================================================================================
# mean
# ======================================================================================

@jax.jit
def _mean_rhs_batch(ops: LinearOperators, acc, batch: SliceBatch, h):
    """Accumulate G^H (w h c y) and the lumped weight G^H (w h c^2) on the padded grid."""
    P = ops.padded_size
    idx, w = _trilinear_corners(_coords(ops, batch.rotations), P)
    wt = batch.image_weight[:, None] * h[None, :]
    vals = jnp.stack([(wt * batch.ctf * batch.y), (wt * batch.ctf ** 2).astype(jnp.complex64)], -1)
    return acc + _scatter(vals, idx, w, P ** 3)


@jax.jit
def _mean_normal_batch(ops: LinearOperators, acc, grid_flat, batch: SliceBatch, h):
    """Accumulate G^H diag(w h c^2) G (F V) for one batch."""
    P = ops.padded_size
    idx, w = _trilinear_corners(_coords(ops, batch.rotations), P)
    s = _gather(grid_flat, idx, w)  # [B, K, 1]
    wt = (batch.image_weight[:, None] * h[None, :] * batch.ctf ** 2)[..., None]
    return acc + _scatter(s * wt, idx, w, P ** 3)


def _noise_weights(ops: LinearOperators, noise_psd) -> Array:
    """h(k) = hp(k) / (D^2 PSD(|k|)) for the frequencies of ``ops``."""
    psd = jnp.asarray(noise_psd, jnp.float32)
    if psd.ndim == 0:
        psd = jnp.full(ops.box_size // 2 + 1, psd)
    r = jnp.minimum(ops.radius, psd.shape[0] - 1)
    return ops.hp / (ops.box_size ** 2 * psd[r])


def _image_weight_fn(weights):
    """Per-batch image weights from a per-dataset-index array (or None = 1)."""
    if weights is None:
        return lambda batch: batch.image_weight
    w = jnp.asarray(np.append(np.asarray(weights, np.float32), 0.0))  # index -1 -> 0

    def fn(batch):
        return batch.image_weight * w[batch.indices]

    return fn


def _lumped_preconditioner(ops: LinearOperators, lumped_grid_flat, prior_grid):
    """Fourier-diagonal approximate inverse of S + R on the D grid (see module doc)."""
    D, P, p = ops.box_size, ops.padded_size, ops.pad_factor
    wd = jnp.real(lumped_grid_flat).reshape(P, P, P)
    wd = wd + jnp.roll(jnp.flip(wd, (0, 1, 2)), 1, (0, 1, 2))  # half-plane insertion -> both halves
    # average over the p^3 block around every D-grid frequency p g, then subsample
    if p > 1:  # tent of half-width p (the trilinear footprint of one D-grid frequency)
        t = np.asarray([(p - abs(d)) / p ** 2 for d in range(-p + 1, p)], np.float32)
        wd = jax.scipy.signal.convolve(wd, jnp.asarray(t[:, None, None] * t[None, :, None] * t[None, None, :]),
                                       mode="same")
    sub = wd[P // 2 - p * (D // 2)::p, P // 2 - p * (D // 2)::p, P // 2 - p * (D // 2)::p][:D, :D, :D]
    denom = 0.5 * (P ** 3) * sub + D ** 3 * prior_grid + 1e-9 * jnp.max(sub) * P ** 3
    s = ops.sinc2

    def precond(v):
        x = fft3_centered(v * s) / denom
        return (ifft3_centered(x).real * s).astype(jnp.float32)

    return precond


class MeanResult(NamedTuple):
    """Output of :func:`solve_mean`.

    volume [D, D, D] (masked), cg (:class:`CGResult`, residual history), noise_psd
    [D//2 + 1] (per-pixel units) used, inv_tau2 [D//2 + 1] regulariser used, seconds.
    """

    volume: np.ndarray
    cg: CGResult
    noise_psd: np.ndarray
    inv_tau2: np.ndarray
    seconds: float


def _mean_passes(data: PreparedImages, ops: LinearOperators, h, weight_fn):
    P = ops.padded_size
    acc = jnp.zeros((P ** 3, 2), jnp.complex64)
    for batch in data.batches():
        acc = _mean_rhs_batch(ops, acc, batch._replace(image_weight=weight_fn(batch)), h)
    return acc


def mean_normal_operator(data: PreparedImages, ops: LinearOperators, noise_psd, image_weights=None):
    """x -> S x (the data term of the mean's normal equations), one pass per call."""
    h = _noise_weights(ops, noise_psd)
    wfn = _image_weight_fn(image_weights)
    P = ops.padded_size

    def apply(x):
        g = _grids(ops, x[None])
        acc = jnp.zeros((P ** 3, 1), jnp.complex64)
        for batch in data.batches():
            acc = _mean_normal_batch(ops, acc, g, batch._replace(image_weight=wfn(batch)), h)
        return _vols(ops, acc)[0]

    return apply


def solve_mean(data: PreparedImages, *, mask=None, noise_psd=None, inv_tau2=None, image_weights=None,
               pad_factor: int = 2, tol: float = 1e-3, max_iter: int = 30, x0=None, wiener: bool = True,
               ridge: float = 1e-4, progress: bool = False) -> MeanResult:
    """Mean map by regularised least squares over the forward operator, solved by PCG.

    Args:
        data: :func:`prepare_images` output.
        mask: [D, D, D] real-space support (None = whole box).
        noise_psd: scalar white-noise variance or radial PSD [D//2+1] (per pixel); default
            white, the median image power of the outer shells (|k| > 3D/8); for white
            noise the Wiener map does not depend on it (data weight and regulariser scale
            together). Estimate it from the mean's residuals afterwards with
            :func:`noise_psd_from_residuals`.
        inv_tau2: [n_shells] regulariser 1/tau^2 per shell (DFT units). None with
            ``wiener=True``: RELION's ``mean_shell(W) / SNR`` from the FSC of two
            lumped (direct-inversion) half maps; None with ``wiener=False``: ``ridge`` times
            the data weight of each shell (a nearly unregularised least-squares solution).
        image_weights: [N] per-image weights (kernel-weighted reconstructions).
        pad_factor: Fourier padding of the trilinear slicing.
        tol, max_iter: CG stopping rule.
        x0: initial map.
        progress: print the CG residuals.

    Returns:
        :class:`MeanResult`.
    """
    t0 = time.time()
    D = data.box_size
    ops = linear_operators(D, data.fs, mask, pad_factor)
    wfn = _image_weight_fn(image_weights)
    if noise_psd is None:  # white, from the image power in the outer shells (the Wiener map does not depend on it)
        p = noise_psd_from_residuals(data, None, ops=ops, image_weights=image_weights)
        noise_psd = float(np.median(p[(3 * D) // 8:]))
    noise_psd = np.broadcast_to(np.asarray(noise_psd, np.float32), (D // 2 + 1,)) if np.ndim(noise_psd) == 0 \
        else np.asarray(noise_psd, np.float32)
    h = _noise_weights(ops, noise_psd)
    acc = _mean_passes(data, ops, h, wfn)
    rhs_grid, lumped = acc[:, :1], acc[:, 1]
    b = _vols(ops, rhs_grid)[0]
    data_shell = _lumped_shell_mean(ops, lumped)
    if inv_tau2 is None:
        if wiener:
            inv_tau2 = _wiener_inv_tau2(data, ops, h, wfn, data_shell)
        else:
            inv_tau2 = ridge * data_shell
    inv_tau2 = np.asarray(inv_tau2, np.float32)
    prior = _fourier_prior(ops, inv_tau2, outside=float(data_shell.max()))
    S = mean_normal_operator(data, ops, noise_psd, image_weights)

    def apply_a(x):
        return S(x) + _apply_prior(ops, prior, x)

    M = _lumped_preconditioner(ops, lumped, prior)
    cb = (lambda j, x, r: print(f"  CG {j}: relative residual {r:.3e}")) if progress else None
    cg = conjugate_gradient(apply_a, b, x0=None if x0 is None else jnp.asarray(x0, jnp.float32), precondition=M,
                            tol=tol, max_iter=max_iter, callback=cb)
    vol = np.asarray(cg.x * ops.mask, np.float32)
    return MeanResult(vol, cg, np.asarray(noise_psd), inv_tau2, time.time() - t0)


def _wiener_inv_tau2(data: PreparedImages, ops: LinearOperators, h, wfn, data_shell) -> np.ndarray:
    """RELION's 1/tau^2 per shell: ``data weight of the shell / SNR`` (prior units).

    Half maps by direct inversion ``N_h / W_h`` of random halves; ``SNR_half = FSC /
    (1 - FSC)``; the full set has twice the half-set SNR (Scheres 2012, eq. 13 with
    Rosenthal & Henderson 2003).
    """
    from jaxhet.analysis import fsc
    from ._reconstruct import grid_to_map, random_half, snr_from_fsc

    D, P = ops.box_size, ops.padded_size
    maps = []
    for half in (0, 1):
        def wf(batch, half=half):
            hv = jnp.asarray(random_half(np.maximum(np.asarray(batch.indices), 0)) == half, jnp.float32)
            return wfn(batch) * hv
        acc = _mean_passes(data, ops, h, wf)
        n = acc[:, 0].reshape(P, P, P)
        w = jnp.real(acc[:, 1]).reshape(P, P, P)
        n = n + jnp.conj(jnp.roll(jnp.flip(n, (0, 1, 2)), 1, (0, 1, 2)))
        w = w + jnp.roll(jnp.flip(w, (0, 1, 2)), 1, (0, 1, 2))
        maps.append(grid_to_map(n / jnp.maximum(w, 1e-3 * jnp.max(w)), D, True))
    snr = snr_from_fsc(np.nan_to_num(fsc(maps[0], maps[1]), nan=0.0))
    n = D // 2 + 1
    snr = np.concatenate([snr, [snr[-1]]])[:n]
    return (np.asarray(data_shell) / np.maximum(2.0 * snr, 1e-3)).astype(np.float32)


# ======================================================================================
# noise
# ======================================================================================

@jax.jit
def _residual_power_batch(ops: LinearOperators, acc, grid_flat, batch: SliceBatch, iw):
    P = ops.padded_size
    idx, w = _trilinear_corners(_coords(ops, batch.rotations), P)
    s = _gather(grid_flat, idx, w)[..., 0]
    r2 = jnp.abs(batch.y - batch.ctf * s) ** 2 * iw[:, None]
    return acc + jnp.sum(r2, 0)


def noise_psd_from_residuals(data: PreparedImages, volume=None, *, ops: LinearOperators | None = None,
                             image_weights=None) -> np.ndarray:
    """Radial noise PSD [D//2 + 1] (per-pixel variance) from image residuals ``y - c P V``.

    With ``volume=None`` the residual is the image itself above a low-frequency cut-off
    (the molecule's signal is a small fraction at SNR << 1; shells below 2 take the value
    of shell 2). With a map (e.g. the mean) the residual power includes the remaining
    heterogeneity: an upper bound of the noise at low frequency.
    """
    D = data.box_size
    ops = ops or linear_operators(D, data.fs)
    v = jnp.zeros((D, D, D), jnp.float32) if volume is None else jnp.asarray(volume, jnp.float32)
    g = _grids(ops, v[None])
    wfn = _image_weight_fn(image_weights)
    acc = jnp.zeros(len(data.fs.freqs), jnp.float32)
    total = 0.0
    for batch in data.batches():
        iw = wfn(batch)
        acc = _residual_power_batch(ops, acc, g, batch, iw)
        total += float(jnp.sum(iw))
    p = np.asarray(acc, np.float64) / max(total, 1e-12) / D ** 2
    r = np.asarray(data.fs.radius)
    hp = 2.0 * np.asarray(data.fs.half_weight)
    n = D // 2 + 1
    psd = np.bincount(np.minimum(r, n - 1), hp * p, minlength=n) / np.maximum(np.bincount(np.minimum(r, n - 1), hp,
                                                                                          minlength=n), 1e-12)
    lo = 2 if volume is None else 1
    psd[:lo] = psd[lo]
    psd[psd <= 0] = psd[psd > 0].min() if np.any(psd > 0) else 1.0
    return psd.astype(np.float32)


# ======================================================================================
# probabilistic PCA: E-step (posterior of b) and M-step (coupled volumes by CG)
# ======================================================================================

def _posterior_batch(ops: LinearOperators, grids, batch: SliceBatch, h, iw):
    """Posterior of b for one batch given volumes (X_0, X_1..X_K) as grids [P^3, K+1].

    Returns mu [B, K], cov [B, K, K], expected residual power per frequency [K_freq]
    (summed over images with weight iw), and the log evidence per image [B] (up to a
    constant): ``-1/2 (r^H h r - beta^T Lambda^-1 beta) - 1/2 log det Lambda``.
    """
    P = ops.padded_size
    idx, w = _trilinear_corners(_coords(ops, batch.rotations), P)
    s = _gather(grids, idx, w)  # [B, Kf, K+1]
    a = batch.ctf[..., None] * s[..., 1:]  # [B, Kf, K]
    r = batch.y - batch.ctf * s[..., 0]
    K = a.shape[-1]
    ah = jnp.conj(a) * h[None, :, None]
    lam = jnp.eye(K) + jnp.einsum("bkj,bkl->bjl", ah, a).real
    beta = jnp.einsum("bkj,bk->bj", ah, r).real
    chol = jnp.linalg.cholesky(lam)
    mu = jax.scipy.linalg.cho_solve((chol, True), beta[..., None])[..., 0]
    cov = jax.scipy.linalg.cho_solve((chol, True), jnp.broadcast_to(jnp.eye(K), lam.shape))
    res = r - jnp.einsum("bkj,bj->bk", a, mu)
    quad = jnp.einsum("bkj,bjl,bkl->bk", jnp.conj(a), cov, a).real
    power = jnp.sum((jnp.abs(res) ** 2 + quad) * iw[:, None], 0)
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
    # log p(y_i) up to a constant: -1/2 (r^H h r - beta^T mu) - 1/2 log det Lambda + 1/2 sum_k hp(k) log h'(k)
    norm = 0.5 * jnp.sum(ops.hp * jnp.log(h / ops.hp))
    ll = -0.5 * (jnp.sum(h * jnp.abs(r) ** 2, -1) - jnp.sum(beta * mu, -1)) - 0.5 * logdet + norm
    return mu, cov, power, ll


@jax.jit
def _estep_rhs_batch(ops: LinearOperators, grids, rhs, lumped, power, batch: SliceBatch, h, iw):
    """E-step for one batch, then accumulate the M-step right-hand side and lumped blocks."""
    P = ops.padded_size
    mu, cov, pw, ll = _posterior_batch(ops, grids, batch, h, iw)
    B, K = mu.shape
    ez = jnp.concatenate([jnp.ones((B, 1)), mu], -1)  # E[z], z = (1, b)
    ezz = jnp.einsum("bj,bl->bjl", ez, ez).at[:, 1:, 1:].add(cov)  # E[z z^T]
    idx, w = _trilinear_corners(_coords(ops, batch.rotations), P)
    hc = iw[:, None] * h[None, :] * batch.ctf
    vals = (hc * batch.y)[..., None] * ez[:, None, :]
    rhs = rhs + _scatter(vals.astype(jnp.complex64), idx, w, P ** 3)
    lw = (hc * batch.ctf)[..., None] * ezz.reshape(B, 1, -1)
    lumped = lumped + _scatter(lw.astype(jnp.float32), idx, w, P ** 3)
    return mu, cov, rhs, lumped, power + pw, ll


@jax.jit
def _ppca_normal_batch(ops: LinearOperators, acc, grids, batch: SliceBatch, h, iw, ezz):
    """Accumulate sum_i G^H h c^2 (M_i G F Z) for one batch (ezz [B, K+1, K+1])."""
    P = ops.padded_size
    idx, w = _trilinear_corners(_coords(ops, batch.rotations), P)
    s = _gather(grids, idx, w)  # [B, Kf, K+1]
    t = jnp.einsum("bkl,bjl->bkj", s, ezz.astype(s.dtype))
    t = t * (iw[:, None] * h[None, :] * batch.ctf ** 2)[..., None]
    return acc + _scatter(t, idx, w, P ** 3)


@jax.jit
def _posterior_only_batch(ops: LinearOperators, grids, batch: SliceBatch, h, iw):
    return _posterior_batch(ops, grids, batch, h, iw)


class PPCAState(NamedTuple):
    """State of the PPCA EM iteration (numpy / jnp arrays).

    Attributes:
        volumes: [K+1, D, D, D] (X_0 the mean, X_1..X_K the components), masked.
        noise_psd: [D//2 + 1] per-pixel noise variance per shell.
        tau2: [K+1, D//2 + 1] prior variance per shell of each volume's DFT.
        mu: [N, K] posterior means of b (dataset order). cov: [N, K, K] posterior covariances.
        log_evidence: per-iteration mean log evidence per image (up to a constant).
        iteration: EM iterations done.
    """

    volumes: np.ndarray
    noise_psd: np.ndarray
    tau2: np.ndarray
    mu: np.ndarray
    cov: np.ndarray
    log_evidence: list
    iteration: int


def _posterior_pass(data: PreparedImages, ops, grids, h, collect_rhs: bool, weight_fn=None):
    """One pass: posteriors of every image (+ M-step right-hand side and lumped blocks)."""
    N = data.n_images
    K = grids.shape[1] - 1
    P = ops.padded_size
    mu = np.zeros((N, K), np.float32)
    cov = np.zeros((N, K, K), np.float32)
    lls = np.zeros(N, np.float64)
    rhs = jnp.zeros((P ** 3, K + 1), jnp.complex64)
    lumped = jnp.zeros((P ** 3, (K + 1) ** 2), jnp.float32)
    power = jnp.zeros(len(data.fs.freqs), jnp.float32)
    wfn = weight_fn or (lambda b: b.image_weight)
    for batch in data.batches():
        iw = wfn(batch)
        if collect_rhs:
            m, c, rhs, lumped, power, ll = _estep_rhs_batch(ops, grids, rhs, lumped, power, batch, h, iw)
        else:
            m, c, pw, ll = _posterior_only_batch(ops, grids, batch, h, iw)
            power = power + pw
        idx = np.asarray(batch.indices)
        keep = idx >= 0
        mu[idx[keep]] = np.asarray(m)[keep]
        cov[idx[keep]] = np.asarray(c)[keep]
        lls[idx[keep]] = np.asarray(ll)[keep]
    return mu, cov, rhs, lumped, power, lls


def _psd_from_power(data: PreparedImages, power, n_weighted: float) -> np.ndarray:
    """Radial PSD (per-pixel units) from summed expected residual power per frequency."""
    D = data.box_size
    p = np.asarray(power, np.float64) / max(n_weighted, 1e-12) / D ** 2
    r = np.asarray(data.fs.radius)
    hp = 2.0 * np.asarray(data.fs.half_weight)
    n = D // 2 + 1
    rr = np.minimum(r, n - 1)
    psd = np.bincount(rr, hp * p, minlength=n) / np.maximum(np.bincount(rr, hp, minlength=n), 1e-12)
    psd[0] = psd[1]
    return psd.astype(np.float32)


def posterior_coefficients(data: PreparedImages, volumes, noise_psd, *, mask=None, pad_factor: int = 2):
    """Posterior mean and covariance of the coefficients b of every image.

    Args:
        data: prepared images.
        volumes: [K+1, D, D, D]: the mean X_0 and components X_1..X_K (prior b ~ N(0, I)).
        noise_psd: scalar or [D//2+1] per-pixel noise variance.
        mask: real-space mask applied to the volumes (None = none).

    Returns:
        ``(mu [N, K], cov [N, K, K], log_evidence [N])`` in dataset order.
    """
    ops = linear_operators(data.box_size, data.fs, mask, pad_factor)
    h = _noise_weights(ops, noise_psd)
    grids = _grids(ops, jnp.asarray(volumes, jnp.float32))
    mu, cov, _, _, _, lls = _posterior_pass(data, ops, grids, h, False)
    return mu, cov, lls


def _block_preconditioner(ops: LinearOperators, lumped_blocks, prior_grids):
    """Block Fourier-diagonal approximate inverse of the M-step operator.

    lumped_blocks: [P^3, (K+1)^2] backprojected h c^2 E[z z^T]; prior_grids: [K+1, D, D, D].
    """
    D, P, p = ops.box_size, ops.padded_size, ops.pad_factor
    V = prior_grids.shape[0]
    wd = lumped_blocks.reshape(P, P, P, V * V)
    wd = wd + jnp.roll(jnp.flip(wd, (0, 1, 2)), 1, (0, 1, 2))
    if p > 1:
        t = np.asarray([(p - abs(d)) / p ** 2 for d in range(-p + 1, p)], np.float32)
        kern = jnp.asarray(t[:, None, None] * t[None, :, None] * t[None, None, :])
        wd = jax.vmap(lambda x: jax.scipy.signal.convolve(x, kern, mode="same"), in_axes=-1, out_axes=-1)(wd)
    o = P // 2 - p * (D // 2)
    sub = wd[o::p, o::p, o::p][:D, :D, :D].reshape(D, D, D, V, V)
    sub = 0.5 * (P ** 3) * 0.5 * (sub + jnp.swapaxes(sub, -1, -2))
    diag = jnp.moveaxis(prior_grids, 0, -1) * D ** 3  # [D, D, D, V]
    scale = jnp.max(jnp.abs(sub))
    blocks = sub + jax.vmap(jnp.diag)(diag.reshape(-1, V)).reshape(D, D, D, V, V) + 1e-9 * scale * jnp.eye(V)
    inv = jnp.linalg.inv(blocks)
    s = ops.sinc2

    def precond(vols):
        f = jax.vmap(fft3_centered)(vols * s)  # [V, D, D, D]
        g = jnp.einsum("zyxjl,lzyx->jzyx", inv.astype(jnp.complex64), f)
        return (jax.vmap(ifft3_centered)(g).real * s).astype(jnp.float32)

    data_diag = jnp.diagonal(sub, axis1=-2, axis2=-1) / D ** 3  # [D, D, D, V] data precision (prior units)
    return jax.jit(precond), data_diag


def _shell_mean_grid(x, D):
    """Mean of a [D, D, D] centred grid over integer shells, [D//2+1] (corners clamp)."""
    r = np.minimum(_shell_index(D), D // 2).ravel()
    n = D // 2 + 1
    return np.bincount(r, np.asarray(x, np.float64).ravel(), minlength=n) / np.maximum(np.bincount(r, minlength=n), 1)


def _update_tau2(volumes, data_diag, tau2, floor_fraction: float = 1e-3):
    """Type-II (evidence) EM update of the per-shell prior variances of each volume's DFT.

    ``tau2(r) <- mean_{|g| in r} ( |V^(g)|^2 + 1 / (d(g) + 1 / tau2_old(r)) )`` with d(g) the
    (lumped) data precision of the DFT value at g: the expected power of the volume under
    its Gaussian posterior (MacKay 1992; RELION's tau^2 without the FSC).
    """
    V, D = volumes.shape[0], volumes.shape[-1]
    out = np.zeros_like(np.asarray(tau2, np.float64))
    r = np.minimum(_shell_index(D), D // 2)
    dd = np.asarray(data_diag, np.float64)
    for j in range(V):
        f = np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(np.asarray(volumes[j], np.float64))))) ** 2
        t_old = np.maximum(np.asarray(tau2[j], np.float64)[r], 1e-30)
        post_var = 1.0 / (dd[..., j] + 1.0 / t_old)
        out[j] = _shell_mean_grid(f + post_var, D)
        out[j] = np.maximum(out[j], floor_fraction * out[j].max() * 1e-6)
    return out.astype(np.float32)


def init_ppca(data: PreparedImages, mean_volume, components, noise_psd, *, tau2=None,
              mean_inv_tau2=None) -> PPCAState:
    """Initial PPCA state from a mean map and K initial components [K, D, D, D].

    ``tau2`` [K+1, D//2+1] defaults to the mean's signal power per shell for every volume
    (``1 / mean_inv_tau2``, the Wiener prior of :func:`solve_mean`, else the mean's shell
    power): a weak prior that lets components known only at low resolution (e.g. from
    :func:`estimate_covariance`) or random starts grow; :func:`ppca_step` then updates
    the components' priors by evidence maximisation (capped by the mean's).
    """
    D = data.box_size
    vols = np.concatenate([np.asarray(mean_volume, np.float32)[None], np.asarray(components, np.float32)], 0)
    if tau2 is None:  # every map's DFT variance per shell = the mean's signal power
        p0 = shell_power(vols[0]) if mean_inv_tau2 is None else 1.0 / np.maximum(np.asarray(mean_inv_tau2), 1e-30)
        tau2 = np.stack([p0] * len(vols))
    K = len(vols) - 1
    N = data.n_images
    psd = np.broadcast_to(np.asarray(noise_psd, np.float32), (D // 2 + 1,)).copy() if np.ndim(noise_psd) == 0 \
        else np.asarray(noise_psd, np.float32)
    return PPCAState(vols, psd, np.asarray(tau2, np.float32), np.zeros((N, K), np.float32),
                     np.tile(np.eye(K, dtype=np.float32), (N, 1, 1)), [], 0)


def ppca_step(data: PreparedImages, state: PPCAState, *, mask=None, pad_factor: int = 2, cg_iter: int = 8,
              cg_tol: float = 1e-3, update_noise: bool = True, update_tau2: bool = True,
              fix_mean: bool = False) -> PPCAState:
    """One EM iteration: E-step (posteriors of b) then M-step (volumes by PCG, noise, priors).

    Args:
        data: prepared images.
        state: current :class:`PPCAState`.
        mask: real-space solvent mask of the volumes.
        cg_iter, cg_tol: inner PCG budget (warm-started from the current volumes).
        update_noise: re-estimate the radial noise PSD from the expected residuals.
        update_tau2: evidence update of the per-shell priors.
        fix_mean: keep X_0 fixed (only the components are fitted).
    """
    ops = linear_operators(data.box_size, data.fs, mask, pad_factor)
    h = _noise_weights(ops, state.noise_psd)
    vols = jnp.asarray(state.volumes, jnp.float32)
    grids = _grids(ops, vols)
    mu, cov, rhs, lumped, power, lls = _posterior_pass(data, ops, grids, h, True)
    V = vols.shape[0]
    K = V - 1
    N = data.n_images
    ezz = np.zeros((N + 1, V, V), np.float32)
    ezz[:N, 0, 0] = 1.0
    ezz[:N, 0, 1:] = mu
    ezz[:N, 1:, 0] = mu
    ezz[:N, 1:, 1:] = cov + mu[:, :, None] * mu[:, None, :]
    ezz_dev = jnp.asarray(ezz)
    b = _vols(ops, rhs)
    # frequencies beyond Nyquist (cube corners) carry no data: a strong prior pins them
    f = np.arange(ops.box_size) - ops.box_size // 2
    rr = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    corner = jnp.asarray(rr > ops.box_size / 2 + 0.5)
    lumped_max = float(jnp.max(jnp.abs(lumped)))
    strong = 0.5 * ops.padded_size ** 3 * lumped_max / ops.box_size ** 3
    prior_grids = jnp.stack([jnp.where(corner, strong, _fourier_prior(ops, 1.0 / np.maximum(state.tau2[j], 1e-30)))
                             for j in range(V)])
    M, data_diag = _block_preconditioner(ops, lumped, prior_grids)
    P = ops.padded_size
    free = jnp.asarray([0.0] + [1.0] * K if fix_mean else [1.0] * V, jnp.float32)[:, None, None, None]

    def apply_full(z):
        g = _grids(ops, z)
        acc = jnp.zeros((P ** 3, V), jnp.complex64)
        for batch in data.batches():
            acc = _ppca_normal_batch(ops, acc, g, batch, h, batch.image_weight,
                                     ezz_dev[jnp.where(batch.indices >= 0, batch.indices, N)])
        return _vols(ops, acc) + jax.vmap(lambda pg, x: _apply_prior(ops, pg, x))(prior_grids, z)

    fixed = vols * (1.0 - free)
    if fix_mean:
        b = b - apply_full(fixed)
    cg = conjugate_gradient(lambda z: apply_full(z * free) * free, b * free, x0=vols * free,
                            precondition=lambda r: M(r) * free, tol=cg_tol, max_iter=cg_iter)
    new = np.asarray((cg.x * free + fixed) * ops.mask, np.float32)
    psd = _psd_from_power(data, power, float(N)) if update_noise else state.noise_psd
    tau2 = np.asarray(state.tau2, np.float32).copy()
    if update_tau2 and K > 0:
        # components: evidence update, capped per shell by the mean's signal power (a
        # component of a small-amplitude motion has no more power than the map itself);
        # X_0 keeps its (Wiener) prior
        upd = _update_tau2(new, data_diag, state.tau2)
        tau2[1:] = np.minimum(upd[1:], tau2[:1])
    log_ev = list(state.log_evidence) + [float(np.mean(lls))]
    return PPCAState(new, psd, tau2, mu, cov, log_ev, state.iteration + 1)


def rotate_to_principal_axes(volumes, mu, cov, mask=None):
    """Rotate PPCA components to orthogonal principal axes (the model is invariant).

    ``W = [X_1 .. X_K]`` (flattened, within the mask) and ``W^T W = Q diag(s) Q^T``: the new
    components ``W Q`` are orthogonal with decreasing norms, the coefficients become
    ``Q^T b`` (posterior covariances ``Q^T C Q``); the prior N(0, I) is unchanged. Signs are
    fixed so that each component's largest-magnitude voxel is positive.

    Returns:
        ``(volumes, mu, cov, Q)``.
    """
    vols = np.asarray(volumes, np.float64)
    K = vols.shape[0] - 1
    if K == 0:
        return np.asarray(volumes, np.float32), mu, cov, np.eye(0)
    W = vols[1:].reshape(K, -1).T
    s, Q = np.linalg.eigh(W.T @ W)
    order = np.argsort(s)[::-1]
    Q = Q[:, order]
    Wn = W @ Q
    for k in range(K):
        if Wn[np.argmax(np.abs(Wn[:, k])), k] < 0:
            Wn[:, k] *= -1
            Q[:, k] *= -1
    out = vols.copy()
    out[1:] = Wn.T.reshape(vols[1:].shape)
    mu2 = np.asarray(mu, np.float64) @ Q
    cov2 = np.einsum("jk,njl,lm->nkm", Q, np.asarray(cov, np.float64), Q)
    return out.astype(np.float32), mu2.astype(np.float32), cov2.astype(np.float32), Q


def linear_movie(volumes, component: int, values) -> np.ndarray:
    """Maps ``V(t) = X_0 + t X_k`` for the values t, [T, D, D, D]."""
    v = np.asarray(volumes, np.float32)
    return np.stack([v[0] + float(t) * v[component] for t in np.asarray(values).ravel()])


class PPCAResult(NamedTuple):
    """Output of :func:`fit_ppca` (principal axes, dataset order).

    volumes [K+1, D, D, D] (X_0, X_1..X_K); mu [N, K] and cov [N, K, K] posterior of b;
    noise_psd [D//2+1]; tau2 [K+1, D//2+1]; mask [D, D, D]; seconds.
    log_evidence: mean log evidence per image (up to a constant) of the volumes after
    j = 0, 1, ... M-steps (entry 0: the initial volumes); best_iteration: the j of the
    returned volumes (the best evidence seen); stopped_early: the evidence stopped improving
    before ``n_iter`` M-steps.
    """

    volumes: np.ndarray
    mu: np.ndarray
    cov: np.ndarray
    noise_psd: np.ndarray
    tau2: np.ndarray
    log_evidence: list
    mask: np.ndarray
    seconds: float
    best_iteration: int = -1
    stopped_early: bool = False


def fit_ppca(data: PreparedImages, n_components: int, *, mean_volume=None, mean_inv_tau2=None,
             init_components=None, mask=None, noise_psd=None, n_iter: int = 15, cg_iter: int = 6,
             pad_factor: int = 2, seed: int = 0, fix_mean: bool = True, early_stop: bool = True, tol: float = 1e-3,
             progress: bool = False, checkpoint: str | None = None, state: PPCAState | None = None) -> PPCAResult:
    """Probabilistic PCA by EM (Tagare et al. 2015) at the images' box.

    Args:
        data: prepared images.
        n_components: K.
        mean_volume: initial X_0 (default: :func:`solve_mean`).
        mean_inv_tau2: the mean's Wiener prior (``MeanResult.inv_tau2``): prior of X_0 and
            cap of the components' priors (default: the mean's shell power).
        init_components: [K, D, D, D] initial X_k (default: :func:`estimate_covariance`
            principal volumes; falls back to small random maps for K larger than found).
        mask: real-space solvent mask (default: :func:`jaxhet.analysis.solvent_mask` of
            the mean with a ~6 A extension and soft edge).
        noise_psd: initial noise PSD (default: from the mean's residuals).
        n_iter: EM iterations. cg_iter: inner PCG iterations per M-step.
        fix_mean: keep X_0 at the initial (CG, Wiener-regularised) mean (default; the
            joint M-step's evidence prior for X_0 is weaker than the FSC-based one).
        early_stop: evidence-based early stopping (default): EM stops as soon as the mean
            log evidence per image (of the volumes entering an E-step) decreases or improves
            by less than ``tol`` nats per image, and the volumes with the best evidence seen
            are returned, with the posteriors of b that their E-step computed (no extra
            pass). EM is not guaranteed to climb this evidence here (the priors tau2 and the
            noise PSD are updated between steps, X_0 is fixed, the M-step's PCG is
            truncated), and on the AdK data set it peaks after one M-step and then slowly
            falls. With ``early_stop=False`` all ``n_iter`` steps run and the last volumes
            are returned.
        tol: the improvement threshold in nats per image (0: stop only on a decrease).
        progress: print per-iteration log evidence.
        checkpoint: path of an ``.npz`` written after every iteration (resumed from if it
            exists and ``state`` is None; it keeps the best iterate too).
        state: a :class:`PPCAState` to continue from.

    Returns:
        :class:`PPCAResult` (rotated to principal axes).
    """
    t0 = time.time()
    D = data.box_size
    K = int(n_components)
    best = None  # (state whose volumes had the best evidence, their posteriors mu, cov)
    if state is None and checkpoint is not None and _exists(checkpoint):
        state, mask, best = load_ppca_checkpoint(checkpoint, with_best=True)
    if state is None:
        if mean_volume is None:
            mres = solve_mean(data, mask=None, pad_factor=pad_factor)
            mean_volume, mean_inv_tau2 = mres.volume, mres.inv_tau2
        if mask is None:
            mask = default_mask(mean_volume, data.pixel_size)
        if noise_psd is None:
            noise_psd = noise_psd_from_residuals(data, mean_volume)
        if init_components is None:
            cov = estimate_covariance(data, mean_volume, noise_psd, n_components=K, mask=mask)
            init_components = cov.components
        init = np.asarray(init_components, np.float32)
        if len(init) < K:
            rng = np.random.default_rng(seed)
            scale = np.linalg.norm(init[0]) if len(init) else 0.1 * np.linalg.norm(mean_volume)
            extra = rng.normal(size=(K - len(init), D, D, D)).astype(np.float32)
            extra *= scale / np.linalg.norm(extra[0]) * np.asarray(mask, np.float32)
            init = np.concatenate([init, extra], 0)
        state = init_ppca(data, np.asarray(mean_volume) * np.asarray(mask), init[:K] * np.asarray(mask), noise_psd,
                          mean_inv_tau2=mean_inv_tau2)
    mask = np.ones((D, D, D), np.float32) if mask is None else np.asarray(mask, np.float32)
    stopped = _evidence_stalled(state.log_evidence, tol) if early_stop else False
    while state.iteration < n_iter and not stopped:
        prev = state
        state = ppca_step(data, state, mask=mask, pad_factor=pad_factor, cg_iter=cg_iter, fix_mean=fix_mean)
        le = state.log_evidence  # le[-1]: evidence of prev's volumes (its E-step), posteriors state.mu/cov
        if progress:
            print(f"  PPCA EM {state.iteration}: log evidence/image of the volumes after {len(le) - 1} M-steps "
                  f"{le[-1]:.4f}", flush=True)
        if best is None or le[-1] > best[0].log_evidence[-1]:
            best = (prev._replace(log_evidence=list(le)), state.mu, state.cov)
        stopped = early_stop and _evidence_stalled(le, tol)
        if checkpoint is not None:
            save_ppca_checkpoint(checkpoint, state, mask, best=best)
    log_ev = list(state.log_evidence)
    if stopped and best is not None:
        final, mu, cov = best[0], best[1], best[2]
        best_it = len(best[0].log_evidence) - 1
    else:
        # posteriors (and evidence) under the last volumes; keep them unless an earlier
        # iterate had a better evidence (early stopping) -- the last M-step's evidence
        # is then part of the record
        mu, cov, lls = posterior_coefficients(data, state.volumes, state.noise_psd, mask=mask, pad_factor=pad_factor)
        log_ev.append(float(np.mean(lls)))
        final, best_it = state, len(log_ev) - 1
        if early_stop and best is not None and best[0].log_evidence[-1] > log_ev[-1]:
            final, mu, cov = best[0], best[1], best[2]
            best_it = len(best[0].log_evidence) - 1
    vols, mu, cov, _ = rotate_to_principal_axes(final.volumes, mu, cov)
    return PPCAResult(vols, mu, cov, final.noise_psd, final.tau2, log_ev, mask, time.time() - t0,
                      best_iteration=best_it, stopped_early=bool(stopped))


def _evidence_stalled(log_evidence, tol: float) -> bool:
    """True when the last entry of the evidence record improves on the previous one by less
    than ``tol`` (a decrease included)."""
    return len(log_evidence) >= 2 and log_evidence[-1] - log_evidence[-2] < tol


def _exists(path):
    import os
    return os.path.exists(path)


def save_ppca_checkpoint(path: str, state: PPCAState, mask, best=None) -> None:
    """Write a :class:`PPCAState` (and mask, and optionally the best iterate ``(state, mu,
    cov)`` of :func:`fit_ppca`'s early stopping) to ``path`` (.npz, atomically)."""
    import os
    tmp = path + ".tmp.npz"
    extra = {}
    if best is not None:
        b, bmu, bcov = best
        extra = dict(best_volumes=b.volumes, best_noise_psd=b.noise_psd, best_tau2=b.tau2, best_mu=bmu,
                     best_cov=bcov, best_log_evidence=np.asarray(b.log_evidence, np.float64),
                     best_iteration=b.iteration)
    np.savez(tmp, volumes=state.volumes, noise_psd=state.noise_psd, tau2=state.tau2, mu=state.mu, cov=state.cov,
             log_evidence=np.asarray(state.log_evidence, np.float64), iteration=state.iteration,
             mask=np.asarray(mask, np.float32), **extra)
    os.replace(tmp, path)


def load_ppca_checkpoint(path: str, with_best: bool = False):
    """Read ``(PPCAState, mask)`` written by :func:`save_ppca_checkpoint`; with
    ``with_best``, ``(PPCAState, mask, best)`` with best ``(state, mu, cov)`` or None."""
    with np.load(path) as f:
        st = PPCAState(f["volumes"], f["noise_psd"], f["tau2"], f["mu"], f["cov"], list(f["log_evidence"]),
                       int(f["iteration"]))
        if not with_best:
            return st, f["mask"]
        best = None
        if "best_volumes" in f:
            best = (PPCAState(f["best_volumes"], f["best_noise_psd"], f["best_tau2"], f["best_mu"], f["best_cov"],
                              list(f["best_log_evidence"]), int(f["best_iteration"])), f["best_mu"], f["best_cov"])
        return st, f["mask"], best


def default_mask(volume, pixel_size: float, extend_in_angstroms: float = 6.0, soft_in_angstroms: float = 8.0):
    """Solvent mask of a map for the linear models: :func:`jaxhet.analysis.solvent_mask`
    (15 A low-pass, automatic threshold) extended by ~6 A with a ~8 A soft edge."""
    from jaxhet.analysis import solvent_mask
    return solvent_mask(volume, pixel_size, extend_in_pixels=max(1.0, extend_in_angstroms / pixel_size),
                        soft_edge_in_pixels=max(1.0, soft_in_angstroms / pixel_size))


# ======================================================================================
# covariance from images (low-resolution least-squares estimator)
# ======================================================================================

class CovarianceMoments(NamedTuple):
    """Sufficient statistics of the least-squares covariance estimator (nearest-neighbour
    discretisation on the integer Fourier grid, ball |g| <= radius + 1).

    H [n, n] float32: ``sum_i w_i w_i^T``. B [n, n] complex64: ``sum_i u_i u_i^H -
    diag(sum_i w_i)`` (noise removed). ball [n, 3] int (gx, gy, gz). radius: image
    frequencies used (cycles per box). n_images.
    """

    H: np.ndarray
    B: np.ndarray
    ball: np.ndarray
    radius: float
    n_images: int


def _ball(radius: float):
    """Integer frequencies with |g| <= radius + sqrt(3)/2 and a cube lookup table."""
    L = int(np.ceil(radius + 1))
    f = np.arange(-L, L + 1)
    gz, gy, gx = np.meshgrid(f, f, f, indexing="ij")
    r = np.sqrt(gx ** 2 + gy ** 2 + gz ** 2)
    inside = r <= radius + np.sqrt(3) / 2 + 1e-6
    ball = np.stack([gx[inside], gy[inside], gz[inside]], -1).astype(np.int32)
    table = np.full(gx.shape, -1, np.int32)
    table[inside] = np.arange(inside.sum(), dtype=np.int32)
    return ball, table, L


@partial(jax.jit, static_argnames=("L", "n_ball"))
def _cov_moments_batch(ops: LinearOperators, H, B, wsum, mean_grid, batch: SliceBatch, sel, mirror, h_full, table,
                       L: int, n_ball: int):
    P = ops.padded_size
    y = batch.y[:, sel]
    c = batch.ctf[:, sel]
    k2 = ops.freqs[sel]
    coords = jnp.einsum("kj,bjl->bkl", k2, batch.rotations[:, :2, :])  # A^T k, unpadded units
    idx, w = _trilinear_corners(coords * ops.pad_factor, P)
    s0 = _gather(mean_grid, idx, w)[..., 0]
    r = (y - c * s0) * batch.image_weight[:, None]
    # full plane: k and (for kx > 0) -k with conjugate values
    r_full = jnp.concatenate([r, jnp.conj(r[:, mirror])], 1)
    c_full = jnp.concatenate([c, c[:, mirror]], 1) * batch.image_weight[:, None]
    g_full = jnp.concatenate([coords, -coords[:, mirror]], 1)
    gi = jnp.clip(jnp.round(g_full).astype(jnp.int32) + L, 0, 2 * L)
    bidx = table[gi[..., 2], gi[..., 1], gi[..., 0]]  # [B, m]
    valid = bidx >= 0
    bidx = jnp.where(valid, bidx, 0)
    u = jnp.where(valid, h_full * c_full * r_full, 0)
    wv = jnp.where(valid, h_full * c_full ** 2, 0)
    flat = (bidx[:, :, None] * n_ball + bidx[:, None, :]).reshape(-1)
    B = B.at[flat].add((u[:, :, None] * jnp.conj(u[:, None, :])).reshape(-1))
    H = H.at[flat].add((wv[:, :, None] * wv[:, None, :]).reshape(-1))
    wsum = wsum.at[bidx.reshape(-1)].add(wv.reshape(-1))
    return H, B, wsum


def covariance_moments(data: PreparedImages, mean_volume, noise_psd, *, radius: float,
                       pad_factor: int = 2, mask=None) -> CovarianceMoments:
    """Accumulate H and B of the least-squares covariance estimator in one pass.

    Args:
        data: prepared images.
        mean_volume: [D, D, D] mean map (residuals ``r_i = y_i - c_i P_i mean``).
        noise_psd: scalar or [D//2+1] per-pixel noise variance.
        radius: image frequencies |k| <= radius (cycles per box) are used.
        mask: real-space mask applied to the mean (as in its own solve).
    """
    D = data.box_size
    ops = linear_operators(D, data.fs, mask, pad_factor)
    k = np.asarray(data.fs.freqs)
    sel = np.nonzero(np.sqrt((k ** 2).sum(-1)) <= radius + 1e-6)[0]
    mirror = np.nonzero(k[sel, 0] > 0)[0]
    ball, table, L = _ball(radius)
    n = len(ball)
    h = np.asarray(_noise_weights(ops, noise_psd)) / (2.0 * np.asarray(data.fs.half_weight))  # 1 / (D^2 PSD)
    h_sel = h[sel]
    h_full = jnp.asarray(np.concatenate([h_sel, h_sel[mirror]]), jnp.float32)
    mean_grid = _grids(ops, jnp.asarray(mean_volume, jnp.float32)[None])
    H = jnp.zeros(n * n, jnp.float32)
    Bm = jnp.zeros(n * n, jnp.complex64)
    wsum = jnp.zeros(n, jnp.float32)
    sel_j, mirror_j, table_j = jnp.asarray(sel), jnp.asarray(mirror), jnp.asarray(table)
    for batch in data.batches():
        H, Bm, wsum = _cov_moments_batch(ops, H, Bm, wsum, mean_grid, batch, sel_j, mirror_j, h_full, table_j, L, n)
    Bm = Bm.reshape(n, n) - jnp.diag(wsum.astype(jnp.complex64))
    return CovarianceMoments(np.asarray(H.reshape(n, n)), np.asarray(Bm), ball, float(radius), data.n_images)


class CovarianceResult(NamedTuple):
    """Output of :func:`estimate_covariance`.

    components [K, D, D, D]: principal volumes ``sqrt(lambda_k) v_k`` (so that
    ``V = mean + sum_k b_k X_k`` with ``b ~ N(0, I)``), upsampled to the data's box.
    eigenvalues [K] (coarse-voxel units), covariance [n, n] (coarse masked voxel basis),
    coarse_mask [Dc, Dc, Dc] bool, radius (cycles per box), cg (:class:`CGResult`),
    seconds.
    """

    components: np.ndarray
    eigenvalues: np.ndarray
    covariance: np.ndarray
    coarse_mask: np.ndarray
    radius: float
    cg: CGResult
    seconds: float


def _coarse_mask(mask, D: int, Dc: int, threshold: float = 0.1) -> np.ndarray:
    """Resample a D-grid mask at the voxel centres of a Dc grid (same physical box)."""
    from scipy.ndimage import map_coordinates
    if mask is None:
        f = np.arange(Dc) - Dc // 2
        r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
        return r <= Dc / 2 - 1
    f = (np.arange(Dc) - Dc // 2) * (D / Dc) + D // 2
    zz, yy, xx = np.meshgrid(f, f, f, indexing="ij")
    m = map_coordinates(np.asarray(mask, np.float64), [zz, yy, xx], order=1, mode="constant")
    return m > threshold


def _ft_rows(X, Dc: int):
    """Centred 3D DFT along the first axis of X [Dc^3, n] (rows are voxels z, y, x)."""
    n = X.shape[1]
    Y = X.reshape(Dc, Dc, Dc, n)
    Y = jnp.fft.fftshift(jnp.fft.fftn(jnp.fft.ifftshift(Y, axes=(0, 1, 2)), axes=(0, 1, 2)), axes=(0, 1, 2))
    return Y.reshape(Dc ** 3, n)


def _ift_rows(X, Dc: int):
    """Adjoint of :func:`_ft_rows` (``N`` times the inverse DFT)."""
    n = X.shape[1]
    Y = X.reshape(Dc, Dc, Dc, n)
    Y = jnp.fft.fftshift(jnp.fft.ifftn(jnp.fft.ifftshift(Y, axes=(0, 1, 2)), axes=(0, 1, 2)), axes=(0, 1, 2))
    return Y.reshape(Dc ** 3, n) * Dc ** 3


def solve_covariance(moments: CovarianceMoments, coarse_mask, *, ridge: float = 1e-2, tol: float = 1e-3,
                     max_iter: int = 10) -> tuple[np.ndarray, CGResult]:
    """Solve the covariance normal equations in the masked coarse voxel basis by PCG.

    The covariance of the coarse map (Dc^3 grid, voxels inside ``coarse_mask``) is S; its
    Fourier form is ``T = F S F^H`` with F the centred 3D DFT of the Dc grid (applied by
    FFTs). The (Tikhonov-regularised) normal equations are

        Re F^H (K o (F S F^H)) F = Re F^H B~ F,     K = H + ridge * max(H)

    (B~ = B on the data ball, 0 elsewhere; off the ball K is the ridge alone). Without
    the mask they are diagonal in the entries of T (the nearest-neighbour discretisation
    decouples them) and ``T = B~ / K``; the support constraint couples them. The ridge
    is a Gaussian prior of equal variance on every entry; it damps the rarely observed
    pairs of high frequencies and bounds the operator's condition number by ~1/ridge.
    PCG starts from the projection ``S0 = Re F^H (B~ / K) F / Dc^6`` of the unmasked
    solution onto the masked basis, with the preconditioner ``S -> Re F^H ((F S F^H) / K)
    F / Dc^6`` (the exact inverse without mask); ``max_iter`` bounds the (early-stopped,
    i.e. further regularised) refinement.

    Returns:
        ``(S [n_vox, n_vox] float32 symmetric, CGResult)``.
    """
    ball = moments.ball
    cm = np.asarray(coarse_mask, bool)
    Dc = cm.shape[-1]
    n3 = Dc ** 3
    if np.abs(ball).max() >= Dc // 2:
        raise ValueError(f"solve_covariance: coarse grid {Dc} too small for the ball (|g| up to {np.abs(ball).max()})")
    gidx = ((ball[:, 2] + Dc // 2) * Dc + (ball[:, 1] + Dc // 2)) * Dc + (ball[:, 0] + Dc // 2)  # ball -> cube row
    vox = np.nonzero(cm.ravel())[0]
    H = np.asarray(moments.H, np.float64)
    lam = ridge * float(H.max())
    Kw = np.full((n3, n3), lam, np.float32)
    Kw[np.ix_(gidx, gidx)] = H + lam
    Kw = jnp.asarray(Kw)
    Bt = jnp.zeros((n3, n3), jnp.complex64).at[jnp.ix_(jnp.asarray(gidx), jnp.asarray(gidx))].set(
        jnp.asarray(moments.B, jnp.complex64))
    vox_j = jnp.asarray(vox)

    def fsf(S):  # F S F^H for S on the masked voxels
        X = jnp.zeros((n3, n3), jnp.complex64).at[jnp.ix_(vox_j, vox_j)].set(S.astype(jnp.complex64))
        A = _ft_rows(X, Dc)
        return jnp.conj(_ft_rows(jnp.conj(A).T, Dc)).T

    def fhyf(Y):  # Re F^H Y F restricted to the masked voxels
        A = _ift_rows(Y, Dc)
        Z = jnp.conj(_ift_rows(jnp.conj(A).T, Dc)).T
        return jnp.real(Z[jnp.ix_(vox_j, vox_j)])

    @jax.jit
    def op(S):
        return fhyf(Kw * fsf(S))

    @jax.jit
    def pre(S):
        out = fhyf(fsf(S) / Kw) / float(n3) ** 2
        return 0.5 * (out + out.T)

    fhyf_j = jax.jit(fhyf)
    rhs = fhyf_j(Bt)
    rhs = 0.5 * (rhs + rhs.T)
    x0 = fhyf_j(Bt / Kw) / float(n3) ** 2
    x0 = 0.5 * (x0 + x0.T)
    cg = conjugate_gradient(op, rhs, x0=x0, precondition=pre, tol=tol, max_iter=max_iter)
    S = np.asarray(0.5 * (cg.x + cg.x.T), np.float32)
    return S, cg


def _upsample_coarse(vec, coarse_mask, D: int, radius: float) -> np.ndarray:
    """Coarse masked-voxel vector -> D-grid map by Fourier padding (mass-conserving),
    low-passed to the estimator's ball."""
    cm = np.asarray(coarse_mask, bool)
    Dc = cm.shape[-1]
    x = np.zeros(cm.shape, np.float64)
    x[cm] = vec
    F = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x)))
    f = np.arange(Dc) - Dc // 2
    rr = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    F = F * (rr <= radius + 1)
    out = np.zeros((D, D, D), complex)
    s = slice(D // 2 - Dc // 2, D // 2 - Dc // 2 + Dc)
    if Dc <= D:
        out[s, s, s] = F
    else:
        t = slice(Dc // 2 - D // 2, Dc // 2 - D // 2 + D)
        out = F[t, t, t]
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(out))).real.astype(np.float32)


def estimate_covariance(data: PreparedImages, mean_volume, noise_psd, *, n_components: int = 4, mask=None,
                        radius: float | None = None, ridge: float = 1e-2, pad_factor: int = 2,
                        tol: float = 1e-3, max_iter: int = 10) -> CovarianceResult:
    """Covariance of the conformations from the images and its top principal volumes.

    Args:
        data: prepared images.
        mean_volume: [D, D, D] mean map.
        noise_psd: per-pixel noise variance (scalar or radial [D//2+1]).
        n_components: K principal volumes to return.
        mask: [D, D, D] real-space support (solvent mask); None = a ball.
        radius: Fourier cut-off in cycles per box (default ``min(D/2 - 1, 6)``: a
            ``2 (radius + 1)`` coarse grid, ~D*a/6 resolution).
        ridge: entrywise Tikhonov weight relative to the largest data weight, and
        max_iter: PCG refinement budget (see :func:`solve_covariance`).

    Returns:
        :class:`CovarianceResult`.
    """
    t0 = time.time()
    D = data.box_size
    R = float(min(D / 2 - 1, 6) if radius is None else radius)
    mom = covariance_moments(data, mean_volume, noise_psd, radius=R, pad_factor=pad_factor)
    Dc = 2 * (int(np.abs(mom.ball).max()) + 1)
    cm = _coarse_mask(mask, D, Dc)
    S, cg = solve_covariance(mom, cm, ridge=ridge, tol=tol, max_iter=max_iter)
    lam, U = np.linalg.eigh(S.astype(np.float64))
    order = np.argsort(lam)[::-1][:n_components]
    lam, U = lam[order], U[:, order]
    comps = []
    for j in range(len(lam)):
        v = _upsample_coarse(U[:, j] * np.sqrt(max(lam[j], 0.0)), cm, D, R)
        if v.reshape(-1)[np.argmax(np.abs(v))] < 0:
            v = -v
        comps.append(v * (1.0 if mask is None else np.asarray(mask, np.float32)))
    return CovarianceResult(np.stack(comps).astype(np.float32), lam.astype(np.float32), S, cm, R, cg,
                            time.time() - t0)
