"""Pose marginalisation and refinement by expectation-maximisation (survey eq. 3).

Model (Scheres 2012): an image ``Y_i`` (half-layout DFT) given the map V, an orientation A
and a translation s is Gaussian around the CTF'd, shifted central slice,

    log p(Y_i | A, s, V) = -1/2 sum_k w_k |Y_ik - c_ik T_s(k) V(A^T k)|^2 / (D^2 sigma^2(|k|)) + const

with ``w`` the Parseval half-plane weights and ``sigma^2(r)`` the per-shell noise power in
per-pixel variance units (white noise of variance s^2 gives s^2). Only frequencies with
``|k| <= r_max`` (the current resolution limit, in cycles per box) enter: comparisons
are frequency-limited. Expanding the square, the pose-dependent part is

    score(A, s) = sum_k w_k/(D^2 sigma_k^2) [ Re(conj(Y_k) T_s(k) c_k M_A(k)) - c_k^2 |M_A(k)|^2 / 2 ]

a matrix product between the shifted images [S, K] and the slices [M, K] (global search:
slices shared by all images; local search: per image, gathered around its current pose).
The E-step turns scores into posterior weights over the rotation x shift grid
(softmax, with an optional Gaussian prior on the shift around the previous one); it
reports the best pose, the posterior-mean pose around it (sub-grid accuracy), the
maximum posterior probability (RELION's rlnMaxValueProbDistribution) and the posterior
angular spread ``sqrt(sum_m p_m angle(A_m, A_best)^2)`` in degrees.

The M-step is a weighted reconstruction (:mod:`._reconstruct`): with ``m_step="best"``
each image is inserted once at its estimated pose (hard EM, RELION's default for
local searches is the full posterior: ``m_step="topk"`` inserts the k most probable
poses with their renormalised posterior weights). Noise power per shell is re-estimated
each iteration from the residuals at the estimated pose. Gold-standard: each half set is
aligned to its own half map; the resolution limit of the next iteration is where the
half-map FSC drops below 0.143, plus a margin.

Coarse-to-fine: :class:`SearchStage` lists per iteration a global SO(3) grid (HEALPix x
psi, :func:`jaxhet.core.so3_grid`) or a local rotation-vector grid around the previous
pose, and a translation grid; ``D = 128`` stays practical because local grids are small
(a few hundred rotations), comparisons are frequency-limited and batched with
``lax.map`` over images.

References: Scheres (2012) J. Struct. Biol. 180:519; Sigworth (1998) J. Struct. Biol.
122:328; Scheres & Chen (2012) Nat. Methods 9:853 (gold standard).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex

from jaxhet.core import CTFParams, axis_angle_to_matrix, fft3_centered, so3_grid, rotation_angle_between
from jaxhet.core._fourier import pad_volume
from jaxhet.core._slicing import _sinc2_correction, _trilinear_corners
from jaxhet.analysis._masks import lowpass_filter

from ._reconstruct import (ReconstructionResult, batch_ctf, batch_image_ft, finalize_reconstruction, frequency_set,
                           init_reconstruction, random_half, _static_fs, _backproject_images_jit,
                           leave_out_map, merge_folds)

__all__ = [
    "SearchStage", "PoseSearchResult", "RefinementResult", "local_rotation_vectors", "shift_grid",
    "prepare_reference", "noise_weights", "local_pose_search", "global_pose_search", "estimate_noise_power",
    "refine", "default_local_schedule", "resolution_to_radius",
]


# --------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------

def local_rotation_vectors(max_angle_in_degrees: float, step_in_degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotation vectors on a cubic grid inside a ball (radians) and their matrices.

    Returns ``(vectors [M, 3], matrices [M, 3, 3])``, the identity included; compose as
    ``A @ dR`` (as :func:`jaxhet.core.local_rotations`).
    """
    n = int(math.floor(max_angle_in_degrees / step_in_degrees + 1e-9))
    g = np.arange(-n, n + 1) * np.deg2rad(step_in_degrees)
    v = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    v = v[np.linalg.norm(v, axis=-1) <= np.deg2rad(max_angle_in_degrees) + 1e-9].astype(np.float32)
    return v, np.asarray(axis_angle_to_matrix(jnp.asarray(v)), np.float32)


def shift_grid(max_shift_in_pixels: float, step_in_pixels: float) -> np.ndarray:
    """Translation offsets [S, 2] on a square grid inside a disc (0 included)."""
    if max_shift_in_pixels <= 0 or step_in_pixels <= 0:
        return np.zeros((1, 2), np.float32)
    n = int(math.floor(max_shift_in_pixels / step_in_pixels + 1e-9))
    g = np.arange(-n, n + 1) * step_in_pixels
    s = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    return s[np.linalg.norm(s, axis=-1) <= max_shift_in_pixels + 1e-9].astype(np.float32)


def resolution_to_radius(resolution_in_angstroms: float, box_size: int, pixel_size: float) -> float:
    """Fourier radius (cycles per box) of a resolution."""
    return box_size * pixel_size / resolution_in_angstroms


@dataclass
class SearchStage:
    """One refinement iteration's search.

    Attributes:
        kind: "global" (SO(3) grid at ``angular_step``) or "local" (rotation-vector grid of
            radius ``angular_range`` and spacing ``angular_step`` around each image's pose).
        angular_step: degrees.
        angular_range: degrees (local only).
        shift_range, shift_step: pixels; the grid is centred on each image's current shift.
    """

    kind: str = "local"
    angular_step: float = 2.0
    angular_range: float = 6.0
    shift_range: float = 2.0
    shift_step: float = 1.0


def default_local_schedule(initial_error_in_degrees: float = 15.0, n_iterations: int = 6,
                           shift_range: float = 2.0) -> list[SearchStage]:
    """Local searches shrinking geometrically from ~1.4 x the expected error.

    Each stage covers its range with ~4 steps per radius (a few hundred rotations); the
    range shrinks by ~2.5 per iteration down to ~1 degree.
    """
    out = []
    rng = max(1.4 * initial_error_in_degrees, 2.0)
    srange, sstep = shift_range, max(shift_range / 2, 0.5)
    for _ in range(n_iterations):
        out.append(SearchStage("local", angular_step=rng / 4, angular_range=rng, shift_range=srange, shift_step=sstep))
        rng = max(rng / 2.5, 1.0)
        srange, sstep = max(srange / 2, 0.5), max(sstep / 2, 0.25)
    return out


# --------------------------------------------------------------------------------------
# reference and noise
# --------------------------------------------------------------------------------------

def prepare_reference(volume, pixel_size: float, resolution_in_angstroms: float | None = None,
                      mask_radius_in_pixels: float | None = None, pad_factor: int = 2) -> Complex[Array, "p p p"]:
    """Padded, gridding-corrected spectrum of a map for slicing, optionally low-passed and
    multiplied by a soft spherical mask (RELION masks references with the particle diameter).
    """
    v = np.asarray(volume, np.float32)
    D = v.shape[-1]
    if resolution_in_angstroms is not None:
        v = lowpass_filter(v, pixel_size, resolution_in_angstroms)
    if mask_radius_in_pixels is not None:
        from jaxhet.core import spherical_mask
        v = v * spherical_mask(D, mask_radius_in_pixels, 5.0)
    P = pad_factor * D
    vv = jnp.asarray(v) / jnp.asarray(_sinc2_correction(D, P))
    return fft3_centered(pad_volume(vv, P))


def noise_weights(noise_power: np.ndarray, fs, box_size: int) -> np.ndarray:
    """Per-frequency likelihood weights ``w_k / (D^2 sigma^2(|k|))`` on a FrequencySet, [K]."""
    p = np.asarray(noise_power, np.float64)
    r = np.minimum(fs.radius, len(p) - 1)
    return (2.0 * fs.half_weight / (box_size ** 2 * np.maximum(p[r], 1e-20))).astype(np.float32)


class PoseSearchResult(NamedTuple):
    """E-step output for a batch (all [B, ...]).

    rotations: estimated A (posterior mean around the best for local searches, best for
    global); shifts: translation in pixels (= -origin); best_rotations, best_shifts: the
    maximum a posteriori grid pose; max_probability; angular_spread_in_degrees;
    log_likelihood: best score (pose-dependent part); residual_power: [B, K_full]
    |Y - model|^2 at the estimated pose over all frequencies to Nyquist (noise update);
    topk_rotations [B, k, 3, 3], topk_shifts [B, k, 2], topk_weights [B, k].
    """

    rotations: Array
    shifts: Array
    best_rotations: Array
    best_shifts: Array
    max_probability: Array
    angular_spread_in_degrees: Array
    log_likelihood: Array
    residual_power: Array
    topk_rotations: Array
    topk_shifts: Array
    topk_weights: Array


def _phase(freqs, shifts, D):
    """exp(-2 pi i k.s / D): [..., S, K] for shifts [..., S, 2], freqs [K, 2]."""
    arg = -2.0 * jnp.pi * jnp.einsum("...sj,kj->...sk", shifts, freqs) / D
    return jnp.exp(1j * arg.astype(jnp.float32))


def _slices(spectrum, rotations, freqs, scale):
    """Central slices [M, K] of a padded spectrum at rotations [M, 3, 3]."""
    coords = jnp.einsum("kj,mjl->mkl", freqs, rotations[:, :2, :]) * scale
    P = spectrum.shape[-1]
    idx, w = _trilinear_corners(coords, P)
    vals = jnp.take(spectrum.reshape(-1), idx, mode="clip")
    return jnp.sum(vals * w, -1)


def _posterior_summary(score, rot_cands, shifts, beta, k_top, dv=None, step_rad=None, A0=None, estimate="near"):
    """Best pose, posterior mean (around the best, or over the whole window), max prob, spread
    and top-k from scores [S, M].

    ``estimate="near"``: rotation = posterior mean of the rotation vectors within one grid
    diagonal of the best (sub-grid refinement of the mode); ``"mean"``: posterior mean of
    the rotation vectors (and shifts) over the whole local window, the minimum-mean-square
    estimate when the window holds the posterior (local searches only; the vectors are
    relative to the current pose, so the mean is taken in its tangent space).
    """
    S, M = score.shape
    logits = beta * score
    flat = logits.reshape(-1)
    lse = jax.nn.logsumexp(flat)
    p = jnp.exp(flat - lse).reshape(S, M)
    best = jnp.argmax(flat)
    bs, bm = best // M, best % M
    A_best = rot_cands[bm]
    p_m = p.sum(0)
    p_s = p.sum(1)
    ang = rotation_angle_between(rot_cands, A_best[None])  # [M]
    spread = jnp.sqrt(jnp.sum(p_m * ang ** 2))
    # sub-grid estimates: posterior mean over the best's neighbourhood
    if dv is not None:
        rel = dv - dv[bm]
        if estimate == "mean":
            wn = p_m
        else:
            wn = p_m * (jnp.linalg.norm(rel, axis=-1) <= 1.01 * math.sqrt(3.0) * step_rad).astype(p_m.dtype)
        vmean = dv[bm] + jnp.sum(wn[:, None] * rel, 0) / jnp.maximum(wn.sum(), 1e-30)
        A_est = A0 @ axis_angle_to_matrix(vmean)
    else:
        A_est = A_best
    s_best = shifts[bs]
    d = jnp.linalg.norm(shifts - s_best, axis=-1)
    if estimate == "mean" and dv is not None:
        ws = p_s
    else:
        ws = p_s * (d <= 1.5 * jnp.maximum(jnp.min(jnp.where(d > 0, d, 1e9)), 1e-6))
    s_est = jnp.sum(ws[:, None] * shifts, 0) / jnp.maximum(ws.sum(), 1e-30)
    top_v, top_i = jax.lax.top_k(flat, k_top)
    tw = jnp.exp(top_v - jax.nn.logsumexp(top_v))
    return A_est, s_est, A_best, s_best, p.reshape(-1)[best], spread, score.reshape(-1)[best], bs, bm, \
        rot_cands[top_i % M], shifts[top_i // M], tw


@partial(jax.jit, static_argnames=("D", "k_top", "fs_full", "fs_cmp", "ctf_sign", "use_ctf", "map_batch", "estimate"))
def _local_search_jit(spectrum, images, ctf_params, A0, s0, omega, dR, dv, step_rad, grid_s, shift_prior_var,
                      beta, pixel_size, D, k_top, fs_full, fs_cmp, ctf_sign, use_ctf, map_batch, estimate="near"):
    fsf, fsc_ = fs_full.value, fs_cmp.value
    P = spectrum.shape[-1]
    scale = P / D
    kf = jnp.asarray(fsf.freqs)
    # comparison frequencies are a prefix-free subset of the full set: index into it
    sub = jnp.asarray(np.searchsorted(fsf.flat_index, fsc_.flat_index))
    kc = kf[sub]
    Yf = batch_image_ft(images, fsf)  # [B, Kf]
    cf = batch_ctf(ctf_params if use_ctf else None, kf, D, pixel_size, ctf_sign, images.shape[0])

    def one(args):
        Y, c, A, s = args
        Yc, cc = Y[sub], c[sub]
        cands = jnp.einsum("ij,mjk->mik", A, dR)
        Sl = _slices(spectrum, cands, kc, scale)  # [M, Kc]
        shifts = s[None] + grid_s  # [S, 2]
        ph = _phase(kc, shifts, D)  # [S, Kc]
        Z = (omega * cc * jnp.conj(Yc))[None] * ph
        cross = Z.real @ Sl.real.T - Z.imag @ Sl.imag.T  # [S, M]
        norm = 0.5 * ((Sl.real ** 2 + Sl.imag ** 2) @ (omega * cc * cc))
        prior = -0.5 * jnp.sum(grid_s ** 2, -1) / shift_prior_var
        score = cross - norm[None] + prior[:, None]
        out = _posterior_summary(score, cands, shifts, beta, k_top, dv, step_rad, A, estimate)
        A_est, s_est = out[0], out[1]
        model = _slices(spectrum, A_est[None], kf, scale)[0] * c * _phase(kf, s_est[None], D)[0]
        res = jnp.abs(Y - model) ** 2
        return out[:7] + (res,) + out[9:]

    outs = jax.lax.map(one, (Yf, cf, A0, s0), batch_size=map_batch)
    return PoseSearchResult(*outs)


def local_pose_search(spectrum, images, ctf_params: CTFParams | None, rotations, shifts_in_pixels, noise_power,
                      pixel_size: float, stage: SearchStage, max_radius: float, *, shift_prior_sigma: float = 3.0,
                      beta: float = 1.0, k_top: int = 4, ctf_sign: str = "relion", map_batch: int = 8,
                      estimate: str = "near") -> PoseSearchResult:
    """Local E-step for a batch: each image searched on ``A_i @ dR`` x ``s_i + grid``.

    Args:
        spectrum: padded reference spectrum (:func:`prepare_reference`) of the map box D.
        images: [B, D, D] real.
        ctf_params: [B] CTFParams or None.
        rotations, shifts_in_pixels: current poses [B, 3, 3], [B, 2] (shift = -origin).
        noise_power: [>= D//2 + 1] per-shell noise power (per-pixel variance units).
        pixel_size: A.
        stage: the local grids.
        max_radius: comparison band |k| <= max_radius (cycles per box).
        shift_prior_sigma: Gaussian prior on the shift offset from the current one (px).
        beta: inverse temperature on the log-likelihood (1 = exact posterior).
        k_top: poses kept for a "topk" M-step.
        map_batch: images vectorised together inside ``lax.map``.
        estimate: "near" (posterior mean next to the best grid pose) or "mean" (posterior
            mean over the whole window; see :func:`_posterior_summary`).
    """
    if estimate not in ("near", "mean"):
        raise ValueError(f"estimate must be 'near' or 'mean', got {estimate!r}")
    images = jnp.asarray(images, jnp.float32)
    B, D = images.shape[0], images.shape[-1]
    fs_full, fs_cmp = _static_fs(D), _static_fs(D, max_radius)
    omega = jnp.asarray(noise_weights(noise_power, fs_cmp.value, D))
    dv, dR = local_rotation_vectors(stage.angular_range, stage.angular_step)
    grid_s = jnp.asarray(shift_grid(stage.shift_range, stage.shift_step))
    cp = ctf_params if ctf_params is not None else CTFParams.create(jnp.zeros(B))
    return _local_search_jit(spectrum, images, cp, jnp.asarray(rotations, jnp.float32),
                             jnp.asarray(shifts_in_pixels, jnp.float32), omega, jnp.asarray(dR), jnp.asarray(dv),
                             jnp.float32(np.deg2rad(stage.angular_step)), grid_s, jnp.float32(shift_prior_sigma ** 2),
                             jnp.float32(beta), jnp.float32(pixel_size), D, min(k_top, len(dv) * len(grid_s)),
                             fs_full, fs_cmp, ctf_sign, ctf_params is not None, map_batch, estimate)


@partial(jax.jit, static_argnames=("D", "k_top", "fs_full", "fs_cmp", "ctf_sign", "use_ctf", "aggregate"))
def _global_search_jit(spectrum, slices_cmp, grid_R, images, ctf_params, s0, omega, grid_s, shift_prior_var, beta,
                       pixel_size, image_weight, D, k_top, fs_full, fs_cmp, ctf_sign, use_ctf, aggregate):
    fsf, fsc_ = fs_full.value, fs_cmp.value
    P = spectrum.shape[-1]
    kf = jnp.asarray(fsf.freqs)
    sub = jnp.asarray(np.searchsorted(fsf.flat_index, fsc_.flat_index))
    kc = kf[sub]
    Yf = batch_image_ft(images, fsf)
    cf = batch_ctf(ctf_params if use_ctf else None, kf, D, pixel_size, ctf_sign, images.shape[0])
    Yc, cc = Yf[:, sub], cf[:, sub]
    shifts = s0[:, None] + grid_s[None]  # [B, S, 2]
    ph = _phase(kc, shifts, D)  # [B, S, Kc]
    Z = (omega * cc * jnp.conj(Yc))[:, None] * ph
    cross = jnp.einsum("bsk,mk->bsm", Z.real, slices_cmp.real) - jnp.einsum("bsk,mk->bsm", Z.imag, slices_cmp.imag)
    norm = 0.5 * (omega * cc * cc) @ (slices_cmp.real ** 2 + slices_cmp.imag ** 2).T  # [B, M]
    prior = -0.5 * jnp.sum(grid_s ** 2, -1) / shift_prior_var
    score = cross - norm[:, None, :] + prior[None, :, None]

    def summ(sc, sh):
        return _posterior_summary(sc, grid_R, sh, beta, k_top)

    out = jax.vmap(summ)(score, shifts)
    A_est, s_est = out[0], out[1]

    def resid(Y, c, A, s):
        m = _slices(spectrum, A[None], kf, P / D)[0] * c * _phase(kf, s[None], D)[0]
        return jnp.abs(Y - m) ** 2

    res = jax.vmap(resid)(Yf, cf, A_est, s_est)
    result = PoseSearchResult(*(out[:7] + (res,) + out[9:]))
    if not aggregate:
        return result, None, None
    # full-posterior M-step terms per grid rotation (comparison band): sum_i,s p c conj(T_s) Y, sum_i p c^2
    logits = beta * score
    p = jnp.exp(logits - jax.nn.logsumexp(logits.reshape(logits.shape[0], -1), axis=-1)[:, None, None])
    p = p * image_weight[:, None, None]
    X = (cc * Yc)[:, None] * jnp.conj(ph)  # [B, S, Kc]
    G = jnp.einsum("bsm,bsk->mk", p, X.real) + 1j * jnp.einsum("bsm,bsk->mk", p, X.imag)
    G2 = jnp.einsum("bm,bk->mk", p.sum(1), cc * cc)
    return result, G, G2


def global_pose_search(spectrum, grid_rotations, images, ctf_params: CTFParams | None, shifts_in_pixels, noise_power,
                       pixel_size: float, max_radius: float, *, shift_range: float = 0.0, shift_step: float = 1.0,
                       shift_prior_sigma: float = 1e3, beta: float = 1.0, k_top: int = 4, ctf_sign: str = "relion",
                       image_weight=None, aggregate: bool = False, slices=None, band_radius: float | None = None):
    """Global E-step for a batch over a shared rotation grid (e.g. :func:`jaxhet.core.so3_grid`).

    Returns ``(PoseSearchResult, G, G2)``; with ``aggregate=True`` G [M, Kc] and G2 [M, Kc]
    are the posterior-weighted sums ``sum_i,s p_ism c_i conj(T_s) Y_i`` and
    ``sum_i p_im c_i^2`` per grid rotation at the comparison frequencies (insert with
    :func:`backproject_slices` for a full-posterior M-step), else None.
    ``slices`` may pass precomputed reference slices [M, Kc] (they depend only on the map).
    ``band_radius`` (>= max_radius): the frequency set of the arrays (slices, G, G2);
    frequencies beyond ``max_radius`` get zero likelihood weight. A fixed band lets a
    growing ``max_radius`` reuse one compiled function.
    """
    images = jnp.asarray(images, jnp.float32)
    B, D = images.shape[0], images.shape[-1]
    band = max_radius if band_radius is None else max(band_radius, max_radius)
    fs_full, fs_cmp = _static_fs(D), _static_fs(D, band)
    omega = noise_weights(noise_power, fs_cmp.value, D) * (np.sqrt((fs_cmp.value.freqs ** 2).sum(-1)) <= max_radius + 1e-6)
    omega = jnp.asarray(omega.astype(np.float32))
    grid_R = jnp.asarray(grid_rotations, jnp.float32)
    if slices is None:
        slices = reference_slices(spectrum, grid_R, D, band)
    grid_s = jnp.asarray(shift_grid(shift_range, shift_step))
    cp = ctf_params if ctf_params is not None else CTFParams.create(jnp.zeros(B))
    w = jnp.ones(B, jnp.float32) if image_weight is None else jnp.asarray(image_weight, jnp.float32)
    return _global_search_jit(spectrum, slices, grid_R, images, cp, jnp.asarray(shifts_in_pixels, jnp.float32), omega,
                              grid_s, jnp.float32(shift_prior_sigma ** 2), jnp.float32(beta), jnp.float32(pixel_size),
                              w, D, min(k_top, grid_R.shape[0] * grid_s.shape[0]), fs_full, fs_cmp, ctf_sign,
                              ctf_params is not None, aggregate)


@partial(jax.jit, static_argnames=("D", "fs_cmp"))
def _reference_slices_jit(spectrum, grid_R, D, fs_cmp):
    k = jnp.asarray(fs_cmp.value.freqs)
    P = spectrum.shape[-1]
    return jax.lax.map(lambda R: _slices(spectrum, R, k, P / D), grid_R.reshape(-1, 256, 3, 3)).reshape(-1, k.shape[0])


def reference_slices(spectrum, grid_rotations, box_size: int, max_radius: float):
    """Slices [M, Kc] of a reference at the comparison frequencies |k| <= max_radius."""
    R = jnp.asarray(grid_rotations, jnp.float32)
    M = R.shape[0]
    pad = (-M) % 256
    Rp = jnp.concatenate([R, jnp.tile(jnp.eye(3)[None], (pad, 1, 1))], 0) if pad else R
    return _reference_slices_jit(spectrum, Rp, box_size, _static_fs(box_size, max_radius))[:M]


def estimate_noise_power(residual_sum_per_shell, count_per_shell, box_size: int) -> np.ndarray:
    """Per-shell noise power (per-pixel variance) from summed |Y - model|^2 and counts."""
    s = np.asarray(residual_sum_per_shell, np.float64)
    c = np.asarray(count_per_shell, np.float64)
    p = s / np.maximum(c, 1) / box_size ** 2
    good = c > 0
    if not good.all() and good.any():  # fill empty shells with the nearest estimated one
        idx = np.nonzero(good)[0]
        p = p[idx[np.argmin(np.abs(np.arange(len(p))[:, None] - idx[None]), axis=1)]]
    return p


# --------------------------------------------------------------------------------------
# refinement driver
# --------------------------------------------------------------------------------------

class RefinementResult(NamedTuple):
    """Output of :func:`refine`.

    rotations [N, 3, 3], origin_in_pixels [N, 2] (RELION sign), max_probability [N],
    angular_spread_in_degrees [N], half [N] (gold-standard half of each image),
    reconstruction (:class:`ReconstructionResult` of that iteration's M-step), noise_power
    [D//2+1], history: list of per-iteration dicts (all iterations run). Poses and map are
    those of the iteration with the best gold-standard resolution (``best_iteration`` in
    the history), see ``patience`` in :func:`refine`.
    """

    rotations: np.ndarray
    origin_in_pixels: np.ndarray
    max_probability: np.ndarray
    angular_spread_in_degrees: np.ndarray
    half: np.ndarray
    reconstruction: ReconstructionResult
    noise_power: np.ndarray
    history: list


def _batches(dataset, batch_size, indices):
    return dataset.batches(batch_size, shuffle=False, indices=indices)


def _pad(x, n):
    x = np.asarray(x)
    if len(x) == n:
        return x
    return np.concatenate([x, np.repeat(x[:1], n - len(x), 0)], 0)


def _pad_ctf(c, n):
    return None if c is None else CTFParams(*[_pad(np.asarray(x, np.float32), n) for x in c])


def refine(dataset, *, initial_volume=None, rotations=None, origin_in_pixels=None, schedule=None,
           initial_resolution_in_angstroms: float = 20.0, max_resolution_in_angstroms: float | None = None,
           resolution_margin_shells: int = 3, mask_radius_in_pixels: float | None = None,
           m_step: str = "best", k_top: int = 4, batch_size: int = 128, shift_prior_sigma: float = 3.0,
           seed: int = 0, ctf_sign: str = "relion", progress: bool = False, callback=None,
           global_slice_budget: int = 6_000_000, adaptive_range: bool = True,
           pose_estimate: str = "near", leave_out_folds: int = 0, patience: int = 2,
           snr_from: str = "unmasked", resolution_tolerance: float = 0.01) -> RefinementResult:
    """Gold-standard EM refinement of poses and map (see module docstring).

    Args:
        dataset: ``jaxhet.io.ParticleDataset`` or :class:`ArrayDataset` (``.batches``,
            ``len``), images of box D (downsample in the dataset).
        initial_volume: starting map [D, D, D] (e.g. from ab initio) or half maps
            [2, D, D, D] (resuming); if None, the half maps are reconstructed from the
            given (rough) poses.
        rotations, origin_in_pixels: starting poses [N, 3, 3], [N, 2] (default: the
            dataset's own, read from batches).
        schedule: list of :class:`SearchStage`, one per iteration (default
            :func:`default_local_schedule`).
        initial_resolution_in_angstroms: low-pass of the starting maps and first
            comparison limit.
        max_resolution_in_angstroms: never compare beyond this (default Nyquist).
        resolution_margin_shells: shells added to the FSC-0.143 radius for the next limit.
        mask_radius_in_pixels: soft spherical mask of the references (default 0.45 D).
        m_step: "best" (insert each image at its estimated pose) or "topk" (k most
            probable grid poses with posterior weights).
        batch_size: images per E-step call.
        shift_prior_sigma: Gaussian prior (px) on shift changes per iteration.
        seed: gold-standard half split.
        callback: optional ``callback(iteration, info_dict, rotations, origin_in_pixels,
            half_maps)`` after each iteration (e.g. to checkpoint).
        global_slice_budget: max B*S*M scores per global-search batch (memory).
        adaptive_range: widen a local stage's window to twice the previous iteration's
            median posterior spread when the schedule asks for less (a window narrower than
            the posterior truncates it and biases the poses towards the previous ones).
        pose_estimate: local searches' pose estimate, "near" (posterior mean next to the
            best grid pose) or "mean" (posterior mean over the window; see
            :func:`local_pose_search`).
        leave_out_folds: K >= 2 splits each half set into K folds, and aligns each
            fold's images to its half map reconstructed without that fold
            (:func:`jaxhet.inference.leave_out_map`, exact), so that no image is scored
            against a map containing itself. Aligning to one's own half map (RELION's
            practice, K = 0, the default) anchors every image to its previous pose at
            low SNR. The halves stay independent (gold standard). Memory: 2 K
            accumulators instead of 2. Measured (experiments/exp_refine_adk.py, AdK
            10k, D=64, SNR 0.1, from 15 deg, K=4): the posterior spread becomes more
            honest (median 2.86 vs 2.05 deg, true median error ~4 deg), the median
            error is unchanged (4.16 vs 4.19 deg).
        patience: stop when the gold-standard resolution (masked half-map FSC 0.143)
            has been worse than the best so far (by more than ``resolution_tolerance``,
            relative) for this many iterations (0: run the whole schedule). The result is
            the last iteration within the tolerance of the best resolution: at low SNR
            the posterior narrows faster than the poses improve and later iterations get
            worse (measured at SNR 0.1: resolution 5.42 -> 5.55 A and median error 3.9 ->
            4.2 deg from iteration 2 to 6; the half-map FSC sees it without the ground
            truth), while at a resolution plateau (SNR 1) finer sampling still improves
            the poses (1.27 -> 1.18 deg at a constant 4.65 A), so ties go to the later
            iteration.
        resolution_tolerance: relative resolution difference treated as a tie.
        snr_from: the half-map FSC that sets the references' Wiener filter (and the maps
            returned): "unmasked" (whole box, filters more; RELION's auto-refine default)
            or "masked" (inside the solvent mask), see :func:`finalize_reconstruction`.
            The resolution reported and used for stopping is always the masked FSC's.
            Measured at SNR 0.1 (experiments/exp_refine_adk.py): "unmasked" gives median
            errors 3.86 / 3.76 / 3.80 deg at iterations 2-4 against 3.92 / 3.84 / 3.94, and
            posterior spreads closer to the true error.

    Returns:
        :class:`RefinementResult`.
    """
    if m_step not in ("best", "topk"):
        raise ValueError("m_step must be 'best' or 'topk'")
    N = len(dataset)
    # -------- current poses
    if rotations is None or origin_in_pixels is None:
        R0 = np.zeros((N, 3, 3), np.float32)
        O0 = np.zeros((N, 2), np.float32)
        for b in _batches(dataset, 1024, None):
            R0[b.indices] = b.rotations
            O0[b.indices] = b.origin_in_pixels
        rotations = R0 if rotations is None else rotations
        origin_in_pixels = O0 if origin_in_pixels is None else origin_in_pixels
    rot = np.array(rotations, np.float32)
    shifts = -np.array(origin_in_pixels, np.float32)
    if not np.isfinite(rot).all():
        raise ValueError("refine: starting rotations are missing (NaN); run abinitio or give poses")
    half = random_half(np.arange(N), seed)
    if patience < 0:
        raise ValueError("patience must be >= 0 (0: run the whole schedule)")
    K = int(leave_out_folds)
    if K == 1 or K < 0:
        raise ValueError("leave_out_folds must be 0 (off) or >= 2")
    fold = np.zeros(N, np.int32)
    if K:  # a balanced random fold within each half
        frng = np.random.default_rng(seed + 1)
        for h in (0, 1):
            ih = np.nonzero(half == h)[0]
            fold[frng.permutation(ih)] = np.arange(len(ih)) % K
    n_folds = max(K, 1)
    group = half * n_folds + fold  # accumulator of each image (= half when K = 0)
    halves_idx = [np.nonzero(half == h)[0] for h in (0, 1)]
    groups_idx = [np.nonzero(group == g)[0] for g in range(2 * n_folds)]
    first = next(iter(_batches(dataset, 1, np.arange(1))))
    D = int(np.shape(first.images)[-1])
    pix = float(first.pixel_size_in_angstroms)
    mask_r = 0.45 * D if mask_radius_in_pixels is None else mask_radius_in_pixels
    schedule = default_local_schedule() if schedule is None else list(schedule)
    nyq = D // 2 - 1
    rmax_cap = nyq if max_resolution_in_angstroms is None else min(nyq, resolution_to_radius(
        max_resolution_in_angstroms, D, pix))
    fs_full = frequency_set(D)
    n_sh = D // 2 + 1
    rad_full = np.minimum(fs_full.radius, n_sh - 1)
    wpar = 2.0 * fs_full.half_weight

    # -------- starting half maps and noise
    def as_halves(st):
        return merge_folds(st, K) if K else st

    def reconstruct_halves(R, S):
        st = init_reconstruction(D, n_groups=2 * n_folds)
        for b in _batches(dataset, batch_size, None):
            n = len(b.indices)
            w = np.zeros(batch_size, np.float32)
            w[:n] = 1
            st = _backproject_images_jit(st, jnp.asarray(_pad(b.images, batch_size)), jnp.asarray(_pad(R[b.indices], batch_size)),
                                         jnp.asarray(_pad(S[b.indices], batch_size)),
                                         _pad_ctf(b.ctf, batch_size) or CTFParams.create(jnp.zeros(batch_size)),
                                         jnp.asarray(_pad(group[b.indices], batch_size)), jnp.asarray(w), jnp.float32(pix),
                                         _static_fs(D), ctf_sign, b.ctf is not None)
        return st

    history = []
    st = None  # the last accumulators (fold-resolved when K > 0)
    if initial_volume is None:
        st = reconstruct_halves(rot, shifts)
        rec = finalize_reconstruction(as_halves(st), pix, snr_from=snr_from)
        maps = [rec.half_maps[0], rec.half_maps[1]]
    else:
        iv = np.asarray(initial_volume, np.float32)
        maps = [iv[0], iv[1]] if iv.ndim == 4 else [iv, iv]
    res_limit = initial_resolution_in_angstroms
    rmax = min(rmax_cap, resolution_to_radius(res_limit, D, pix))
    # initial noise: residuals at the starting poses against the low-passed start
    noise = None
    maxp = np.zeros(N, np.float32)
    spread = np.zeros(N, np.float32)

    prev_spread = None
    best = None  # (resolution, iteration, rot, shifts, maxp, spread, rec, noise) of the iteration kept
    res_best = np.inf
    stale = 0
    for it, stage in enumerate(schedule):
        t0 = time.time()
        if adaptive_range and stage.kind == "local" and prev_spread is not None \
                and stage.angular_range < 2.0 * prev_spread:
            # never search a window narrower than the posterior (RELION adapts its sampling likewise)
            rng_deg = 2.0 * prev_spread
            stage = SearchStage("local", max(stage.angular_step, rng_deg / 4), rng_deg, stage.shift_range,
                                stage.shift_step)
        prev_st = st if K else None  # fold accumulators of the maps being aligned to
        specs = None
        if noise is None or prev_st is None:
            specs = [prepare_reference(m, pix, res_limit if it == 0 else None, mask_r) for m in maps]
        if noise is None:
            noise = _initial_noise(dataset, specs, rot, shifts, half, D, pix, batch_size, ctf_sign)
        if prev_st is None:
            del st
        st = init_reconstruction(D, n_groups=2 * n_folds)
        res_sum = np.zeros(n_sh)
        res_cnt = np.zeros(n_sh)
        new_rot = rot.copy()
        new_shift = shifts.copy()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=N, unit="img", desc=f"refine {it + 1}/{len(schedule)} r<={rmax:.1f}")
        for g in range(2 * n_folds):
            h = g // n_folds
            if prev_st is not None:  # this fold's half map without its own images
                spec = prepare_reference(leave_out_map(prev_st, g, K, rec.snr, pix), pix,
                                         res_limit if it == 0 else None, mask_r)
            else:
                spec = specs[h]
            if stage.kind == "global":
                grid_R, _ = so3_grid(stage.angular_step)
                slices = reference_slices(spec, grid_R, D, rmax)
                S = len(shift_grid(stage.shift_range, stage.shift_step))
                bsz = int(max(1, min(batch_size, global_slice_budget // (S * len(grid_R)))))
            else:
                bsz = batch_size
            for b in _batches(dataset, bsz, groups_idx[g]):
                n = len(b.indices)
                idx = b.indices
                imgs = _pad(b.images, bsz)
                ctfb = _pad_ctf(b.ctf, bsz)
                if stage.kind == "global":
                    out, _, _ = global_pose_search(spec, grid_R, imgs, ctfb, _pad(shifts[idx], bsz), noise, pix, rmax,
                                                   shift_range=stage.shift_range, shift_step=stage.shift_step,
                                                   shift_prior_sigma=shift_prior_sigma, k_top=k_top,
                                                   ctf_sign=ctf_sign, slices=slices)
                else:
                    out = local_pose_search(spec, imgs, ctfb, _pad(rot[idx], bsz), _pad(shifts[idx], bsz), noise,
                                            pix, stage, rmax, shift_prior_sigma=shift_prior_sigma, k_top=k_top,
                                            ctf_sign=ctf_sign, estimate=pose_estimate)
                new_rot[idx] = np.asarray(out.rotations)[:n]
                new_shift[idx] = np.asarray(out.shifts)[:n]
                maxp[idx] = np.asarray(out.max_probability)[:n]
                spread[idx] = np.asarray(out.angular_spread_in_degrees)[:n]
                rp = np.asarray(out.residual_power)[:n]
                res_sum += np.bincount(rad_full, (rp * wpar[None]).sum(0), minlength=n_sh)[:n_sh]
                res_cnt += n * np.bincount(rad_full, wpar, minlength=n_sh)[:n_sh]
                # M-step
                w = np.zeros(bsz, np.float32)
                w[:n] = 1
                hh = jnp.full(bsz, g, jnp.int32)
                cp = ctfb or CTFParams.create(jnp.zeros(bsz))
                if m_step == "best":
                    st = _backproject_images_jit(st, jnp.asarray(imgs), out.rotations, out.shifts, cp, hh,
                                                 jnp.asarray(w), jnp.float32(pix), _static_fs(D), ctf_sign,
                                                 b.ctf is not None)
                else:
                    for j in range(out.topk_weights.shape[1]):
                        st = _backproject_images_jit(st, jnp.asarray(imgs), out.topk_rotations[:, j],
                                                     out.topk_shifts[:, j], cp, hh,
                                                     jnp.asarray(w) * out.topk_weights[:, j], jnp.float32(pix),
                                                     _static_fs(D), ctf_sign, b.ctf is not None)
                if bar is not None:
                    bar.update(n)
        if bar is not None:
            bar.close()
        rot, shifts = new_rot, new_shift
        prev_spread = float(np.median(spread))
        noise = estimate_noise_power(res_sum, res_cnt, D)
        del prev_st
        rec = finalize_reconstruction(as_halves(st), pix, snr_from=snr_from)
        maps = [rec.half_maps[0], rec.half_maps[1]]
        # next resolution limit: FSC 0.143 radius (masked half maps) + margin
        res_limit = rec.resolution_0143
        r_fsc = resolution_to_radius(res_limit, D, pix)
        rmax = float(min(rmax_cap, r_fsc + resolution_margin_shells))
        info = dict(iteration=it + 1, kind=stage.kind, angular_step=stage.angular_step,
                    angular_range=stage.angular_range, resolution_0143=rec.resolution_0143,
                    resolution_05=rec.resolution_05, next_max_radius=rmax,
                    mean_max_probability=float(maxp.mean()), median_angular_spread=float(np.median(spread)),
                    seconds=time.time() - t0)
        # not worse than the best resolution so far (within the tolerance): the latest such
        # iteration is kept (finer sampling at a resolution plateau); worse ones count
        # towards the patience
        res_best = min(res_best, rec.resolution_0143)
        if rec.resolution_0143 <= res_best * (1 + resolution_tolerance):
            best = (rec.resolution_0143, it + 1, rot, shifts, maxp.copy(), spread.copy(), rec, noise)
            stale = 0
        else:
            stale += 1
        info["best_iteration"] = best[1]
        stop = bool(patience) and stale >= patience and it + 1 < len(schedule)
        if stop:
            info["stopped"] = (f"resolution worse than the best ({res_best:.2f} A) for {stale} iterations; "
                               f"keeping iteration {best[1]} ({best[0]:.2f} A)")
        history.append(info)
        if callback is not None:
            callback(it + 1, info, rot, -shifts, np.stack(maps))
        if stop:
            break
    _, _, rot, shifts, maxp, spread, rec, noise = best
    return RefinementResult(rot, -shifts, maxp, spread, half, rec, noise, history)


def _initial_noise(dataset, specs, rot, shifts, half, D, pix, batch_size, ctf_sign, max_images: int = 2000):
    """Per-shell noise power from residuals at the starting poses (first ``max_images``)."""
    fs = frequency_set(D)
    n_sh = D // 2 + 1
    rad = np.minimum(fs.radius, n_sh - 1)
    wpar = 2.0 * fs.half_weight
    res_sum = np.zeros(n_sh)
    res_cnt = np.zeros(n_sh)
    stage = SearchStage("local", angular_step=1.0, angular_range=0.0, shift_range=0.0, shift_step=1.0)
    N = len(dataset)
    sel = np.arange(min(N, max_images))
    flat = np.ones(n_sh, np.float32)
    for b in _batches(dataset, batch_size, sel):
        n = len(b.indices)
        idx = b.indices
        for h in (0, 1):
            m = half[idx] == h
            if not m.any():
                continue
            k = int(m.sum())
            out = local_pose_search(specs[h], _pad(b.images[m], batch_size), _pad_ctf(
                None if b.ctf is None else CTFParams(*[np.asarray(x)[m] for x in b.ctf]), batch_size),
                _pad(rot[idx][m], batch_size), _pad(shifts[idx][m], batch_size), flat, pix, stage, 1.0,
                ctf_sign=ctf_sign)
            rp = np.asarray(out.residual_power)[:k]
            res_sum += np.bincount(rad, (rp * wpar[None]).sum(0), minlength=n_sh)[:n_sh]
            res_cnt += k * np.bincount(rad, wpar, minlength=n_sh)[:n_sh]
        del n
    return estimate_noise_power(res_sum, res_cnt, D)
