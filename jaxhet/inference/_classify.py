"""3D classification: K maps, expectation-maximisation over class (and pose) per image
(survey §2.2, eq. 4; Scheres 2010, 2012: RELION ``class3D``).

Model. Image i (half-layout DFT ``Y_i``, CTF ``c_i``) is drawn from one of K maps V_k
with prior probability pi_k, at a pose (A, s) near its given (consensus) pose, under
Gaussian noise of per-shell variance sigma^2(|k|)::

    p(Y_i | k, A, s) ~ exp( -1/2 sum_{0 < |f| <= r_t} w_f |Y_if - c_if T_s(f) V_k(A^T f)|^2 / (D^2 sigma^2(|f|)) )

(``w_f`` the half-plane Parseval weights; :func:`jaxhet.core.gaussian_log_likelihood`).
Only frequencies inside the current resolution limit ``r_t`` (shells) enter; r_t grows over
the iterations with the class maps' gold-standard resolution, as RELION's ``current_size``.

E-step (per image, streamed in batches). With a local search, the pose runs over a grid
``A_i dR_m`` (rotations within ``local_search_in_degrees`` of the current pose,
:func:`jaxhet.core.local_rotation_grid`) times in-plane shifts ``s_i + ds`` with a Gaussian
prior (sigma = range / 3, as RELION's local searches); without one, the given pose is used.
The class posterior marginalises the pose (eq. 4)::

    gamma_ik = pi_k sum_{m,s} p(m,s) p(Y_i | k, A_m, s) / sum_k' (...)

M-step. Each class map is a weighted known-pose reconstruction of all images (weight
gamma_ik, at the image's most likely pose within class k) through the reconstruction
engine (:func:`jaxhet.inference.backproject_slices`, gold-standard half sets, Wiener
filter of :func:`jaxhet.inference.finalize_reconstruction`); pi_k = mean_i gamma_ik; the noise
spectrum is the gamma-weighted mean residual power per shell. A class whose weight falls
below ``min_class_fraction`` is re-seeded by splitting the largest class (the empty class
takes one of its half maps, the large class keeps the other).

Initial maps: reconstructions from K random disjoint subsets of the images (given poses).

Everything is a pure ``init``/``step`` pair over an explicit :class:`ClassificationState`
(like optax): :func:`init_classification`, :func:`classification_step`; :func:`classify`
is the driver (progress bar, per-iteration checkpoint and resume).

References: Scheres (2010) Methods Enzymol. 482:295 (ML classification); Scheres (2012)
J. Struct. Biol. 180:519 (RELION); Scheres (2016) Methods Enzymol. 579:125 (RELION 3D
classification; local searches, current_size).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhet.core import CTFParams, ctf as ctf_fn, gather_trilinear, local_rotation_grid, origin_to_shift, \
    prepare_volume, rfft2_centered, shift_phase

from ._checkpoint import load_state_npz, save_state_npz
from ._reconstruct import ReconstructionState, backproject_slices, finalize_reconstruction, frequency_set, \
    random_half

__all__ = ["ClassificationConfig", "ClassificationState", "ClassificationStats",
           "init_classification", "classification_step", "classify", "class_log_likelihood_batch",
           "save_classification_state", "load_classification_state", "local_shift_grid"]


# --------------------------------------------------------------------------------------
# particle sources (jaxhet.io.ParticleDataset, jaxhet.inference.ArrayDataset)
# --------------------------------------------------------------------------------------

def _padded_batches(source, batch_size: int) -> Iterator[tuple]:
    """(images, rotations, origins, ctf or None, indices, n_valid, pixel_size) padded to batch_size."""
    for b in source.batches(batch_size, shuffle=False):
        n = len(b.images)
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            m = e - s

            def pad(x):
                x = np.asarray(x)[s:e]
                if m == batch_size:
                    return x
                return np.concatenate([x, np.repeat(x[:1], batch_size - m, axis=0)], 0)

            c = None
            if b.ctf is not None and np.isfinite(np.asarray(b.ctf.defocus_u_in_angstroms, np.float64)[s:e]).all():
                c = CTFParams(*[pad(np.asarray(x, np.float32)) for x in b.ctf])  # NaN defocus: no CTF known
            yield (pad(np.asarray(b.images, np.float32)), pad(np.asarray(b.rotations, np.float32)),
                   pad(np.asarray(b.origin_in_pixels, np.float32)), c, np.asarray(b.indices)[s:e], m,
                   float(b.pixel_size_in_angstroms))


def _source_info(source) -> tuple[int, int, float]:
    """(N, image box, pixel size) of a particle source."""
    n = len(source)
    D = getattr(source, "image_size", None)
    pix = getattr(source, "pixel_size_in_angstroms", None)
    if D is None or pix is None:
        b = next(iter(source.batches(1, shuffle=False)))
        D, pix = np.asarray(b.images).shape[-1], b.pixel_size_in_angstroms
    return int(n), int(D), float(pix)


# --------------------------------------------------------------------------------------
# configuration and state
# --------------------------------------------------------------------------------------

class ClassificationConfig(NamedTuple):
    """Static settings of a classification run.

    Attributes:
        n_classes: K.
        local_search_in_degrees: half-width of the local rotation search around the
            current pose (0: poses fixed).
        local_step_in_degrees: spacing of the local rotation grid (default: half the range).
        shift_search_in_pixels: half-width of the in-plane shift search (0: shifts fixed).
        shift_step_in_pixels: spacing of the shift grid.
        initial_resolution_in_angstroms: resolution limit of the first E-step.
        resolution_increment_in_shells: r_{t+1} = max(r_t, r_FSC=0.143 + increment).
        min_class_fraction: classes with less than this fraction of ``N / K`` images are
            re-seeded (split of the largest class).
        pad_factor: Fourier padding of the projector / reconstructor.
        batch_size: images per jitted step (reduced automatically for big pose grids).
        ctf_sign: "relion" or "cryodrgn".
        seed: random subsets and half sets.
        tau2_fudge: RELION's T (regularisation of the class maps).
    """

    n_classes: int = 2
    local_search_in_degrees: float = 0.0
    local_step_in_degrees: float | None = None
    shift_search_in_pixels: float = 0.0
    shift_step_in_pixels: float = 1.0
    initial_resolution_in_angstroms: float = 30.0
    resolution_increment_in_shells: int = 3
    min_class_fraction: float = 0.05
    pad_factor: int = 2
    batch_size: int = 256
    ctf_sign: str = "relion"
    seed: int = 0
    tau2_fudge: float = 1.0


class ClassificationState(NamedTuple):
    """Everything a classification iteration needs (numpy arrays; picklable, saved as npz).

    Attributes:
        maps: [K, D, D, D] current class maps (Wiener-filtered, mass per voxel).
        half_maps: [K, 2, D, D, D] gold-standard half maps of each class.
        class_priors: [K] pi_k.
        noise_psd: [D//2 + 1] noise variance per shell (per-pixel units).
        max_radius: current resolution limit r_t (shells = cycles per box).
        fsc: [K, D//2] half-map FSC of each class.
        rotations: [N, 3, 3] current pose of each image (updated by local searches).
        origin_in_pixels: [N, 2] current RELION origins.
        class_probs: [N, K] gamma_ik of the last E-step (input order).
        iteration: completed EM iterations (0 after init).
        pixel_size: of the maps (A).
    """

    maps: np.ndarray
    half_maps: np.ndarray
    class_priors: np.ndarray
    noise_psd: np.ndarray
    max_radius: float
    fsc: np.ndarray
    rotations: np.ndarray
    origin_in_pixels: np.ndarray
    class_probs: np.ndarray
    iteration: int
    pixel_size: float


class ClassificationStats(NamedTuple):
    """Diagnostics of one step: ``log_likelihood`` (sum over images of log p(Y_i), up to a
    constant), ``changed_fraction`` (images whose most likely class changed), ``class_sizes``
    [K] (sum of gamma, before any re-seeding), ``resolution`` [K] (A, FSC 0.143 of each class), ``max_radius``
    used in this E-step (shells), ``reseeded`` (list of re-seeded classes),
    ``mean_pose_change_in_degrees`` (local searches)."""

    log_likelihood: float
    changed_fraction: float
    class_sizes: np.ndarray
    resolution: np.ndarray
    max_radius: float
    reseeded: list
    mean_pose_change_in_degrees: float


def local_shift_grid(range_in_pixels: float, step_in_pixels: float = 1.0) -> np.ndarray:
    """In-plane shift offsets [S, 2] (px) on a square grid inside a disc of radius ``range``."""
    if range_in_pixels <= 0:
        return np.zeros((1, 2), np.float32)
    n = int(np.floor(range_in_pixels / step_in_pixels + 1e-9))
    g = np.arange(-n, n + 1) * step_in_pixels
    s = np.stack(np.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    return s[np.linalg.norm(s, axis=-1) <= range_in_pixels + 1e-9].astype(np.float32)


def _pose_grid(cfg: ClassificationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dR [M, 3, 3], dS [S, 2], normalised log prior [M, S]) of the local search."""
    if cfg.local_search_in_degrees > 0:
        step = cfg.local_step_in_degrees or cfg.local_search_in_degrees / 2
        dR = local_rotation_grid(cfg.local_search_in_degrees, step)
        ang = np.degrees(np.arccos(np.clip((np.trace(dR, axis1=1, axis2=2) - 1) / 2, -1, 1)))
        sig_r = cfg.local_search_in_degrees / 3
        lp_r = -0.5 * (ang / sig_r) ** 2
    else:
        dR = np.eye(3, dtype=np.float32)[None]
        lp_r = np.zeros(1)
    dS = local_shift_grid(cfg.shift_search_in_pixels, cfg.shift_step_in_pixels)
    if cfg.shift_search_in_pixels > 0:
        lp_s = -0.5 * (np.linalg.norm(dS, axis=-1) / (cfg.shift_search_in_pixels / 3)) ** 2
    else:
        lp_s = np.zeros(1)
    lp = lp_r[:, None] + lp_s[None, :]
    lp = lp - np.log(np.exp(lp - lp.max()).sum()) - lp.max()
    return dR.astype(np.float32), dS.astype(np.float32), lp.astype(np.float32)


# --------------------------------------------------------------------------------------
# the jitted batch step: E-step and M-step accumulation
# --------------------------------------------------------------------------------------

class _Acc(NamedTuple):
    numerator: jax.Array   # [K, 2, P, P, P] complex64
    weight: jax.Array      # [K, 2, P, P, P] float32
    count: jax.Array       # [K, 2]
    noise_num: jax.Array   # [D//2 + 1]
    noise_den: jax.Array   # [D//2 + 1]


def _init_acc(K: int, D: int, pad_factor: int) -> _Acc:
    P = D * pad_factor
    return _Acc(jnp.zeros((K, 2, P, P, P), jnp.complex64), jnp.zeros((K, 2, P, P, P), jnp.float32),
                jnp.zeros((K, 2), jnp.float32), jnp.zeros(D // 2 + 1, jnp.float32), jnp.zeros(D // 2 + 1, jnp.float32))


def class_log_likelihood_batch(spectra, images, rotations, shifts, ctf_params, lik_weight, freqs, flat_index,
                               dR, dS, pose_log_prior, pixel_size, box_size: int, pad_factor: int,
                               ctf_sign: str = "relion", use_ctf: bool = True):
    """Per-image, per-class, per-pose Gaussian log-likelihoods (up to a per-image constant).

    Args:
        spectra: [K, P, P, P] prepared class maps (:func:`jaxhet.core.prepare_volume`).
        images: [B, D, D] real images.
        rotations: [B, 3, 3] centre poses; shifts: [B, 2] centre translations (px, = -origin).
        ctf_params: CTFParams [B] (ignored if not use_ctf).
        lik_weight: [F] ``w_f [r_f <= r_t] / (D^2 sigma^2(r_f))`` at the frequencies ``freqs``.
        freqs: [F, 2] half-plane frequencies (cycles/box); flat_index: [F] their index in
            the flattened half layout.
        dR: [M, 3, 3] local rotations (pose = A dR); dS: [S, 2] shift offsets (px);
        pose_log_prior: [M, S].

    Returns:
        dict with ``log_lik`` [B, K, M, S] (pose prior included), ``y`` [B, F] image DFT,
        ``c`` [B, F] CTF, ``slices`` [B, K, M, F], ``phases`` [B, S, F].
    """
    D = box_size
    P = D * pad_factor
    freqs = jnp.asarray(freqs)
    k_phys = freqs / (D * pixel_size)

    def one(img, A, s, cp):
        y = rfft2_centered(img).reshape(-1)[flat_index]
        c = ctf_fn(cp, k_phys, ctf_sign) if use_ctf else jnp.ones(freqs.shape[0], jnp.float32)
        Am = jnp.einsum("ij,mjk->mik", A, dR)
        coords = (freqs[None, :, 0:1] * Am[:, None, 0] + freqs[None, :, 1:2] * Am[:, None, 1]) * (P / D)
        V = jax.vmap(lambda sp: gather_trilinear(sp, coords))(spectra)  # [K, M, F]
        phi = jax.vmap(lambda ds: shift_phase(freqs, s + ds, D))(dS)  # [S, F]
        a = jnp.conj(y) * c * lik_weight
        cross = jnp.einsum("kmf,sf->kms", V * a, phi).real
        power = jnp.einsum("kmf,f->km", (V.real ** 2 + V.imag ** 2), c * c * lik_weight)
        ll = cross - 0.5 * power[..., None] + pose_log_prior[None]
        return ll, y, c, V, phi

    ll, y, c, V, phi = jax.vmap(one)(images, rotations, shifts, ctf_params)
    return dict(log_lik=ll, y=y, c=c, slices=V, phases=phi)


@partial(jax.jit, static_argnames=("box_size", "pad_factor", "ctf_sign", "use_ctf", "estep"), donate_argnums=(0,))
def _em_batch(acc: _Acc, spectra, images, rotations, shifts, ctf_params, valid, half, gamma_fixed, log_priors,
              lik_weight, parseval, hw, freqs, flat_index, radius, dR, dS, pose_log_prior, pixel_size, *,
              box_size: int, pad_factor: int, ctf_sign: str, use_ctf: bool, estep: bool):
    D = box_size
    B = images.shape[0]
    freqs = jnp.asarray(freqs)
    if estep:
        out = class_log_likelihood_batch(spectra, images, rotations, shifts, ctf_params, lik_weight, freqs, flat_index,
                                         dR, dS, pose_log_prior, pixel_size, D, pad_factor, ctf_sign, use_ctf)
        ll, y, c, V, phi = out["log_lik"], out["y"], out["c"], out["slices"], out["phases"]
        K, M, S = ll.shape[1:]
        flat = ll.reshape(B, K, M * S)
        lse = jax.nn.logsumexp(flat, axis=-1)  # [B, K]
        logp = lse + log_priors[None]
        gamma = jax.nn.softmax(logp, axis=-1)
        log_evidence = jax.nn.logsumexp(logp, axis=-1)
        best = jnp.argmax(flat, axis=-1)  # [B, K]
        m_best, s_best = best // S, best % S
        Am = jnp.einsum("bij,mjk->bmik", rotations, dR)
        R_best = jnp.take_along_axis(Am, m_best[:, :, None, None], axis=1)  # [B, K, 3, 3]
        sh_best = shifts[:, None, :] + jnp.asarray(dS)[s_best]  # [B, K, 2]
        V_best = jnp.take_along_axis(V, m_best[:, :, None, None], axis=2)[:, :, 0]  # [B, K, F]
        phi_best = jnp.take_along_axis(phi, s_best[:, :, None], axis=1)  # [B, K, F]
        model = c[:, None] * V_best * phi_best
        resid2 = jnp.abs(y[:, None] - model) ** 2  # [B, K, F]
    else:
        gamma = gamma_fixed
        y = jax.vmap(lambda im: rfft2_centered(im).reshape(-1)[flat_index])(images)
        k_phys = freqs / (D * pixel_size)
        c = jax.vmap(lambda cp: ctf_fn(cp, k_phys, ctf_sign))(ctf_params) if use_ctf else \
            jnp.ones(y.shape, jnp.float32)
        K = gamma.shape[1]
        R_best = jnp.broadcast_to(rotations[:, None], (B, K, 3, 3))
        sh_best = jnp.broadcast_to(shifts[:, None], (B, K, 2))
        phi_best = jax.vmap(lambda s: shift_phase(freqs, s, D))(shifts)[:, None]  # [B, 1, F]
        resid2 = jnp.abs(y[:, None]) ** 2 * jnp.ones((1, K, 1))
        log_evidence = jnp.zeros(B)
        m_best = jnp.zeros((B, K), jnp.int32)
    g = gamma * valid[:, None]  # [B, K]
    vals = hw[None, None] * c[:, None] * jnp.conj(phi_best) * y[:, None] * g[..., None]  # [B, K, F]
    ctf2 = hw[None, None] * (c * c)[:, None] * g[..., None]

    def insert(num, wt, R, v, w2):
        st = ReconstructionState(num, wt, jnp.zeros(2), D, pad_factor)
        st = backproject_slices(st, R, v, w2, half, freqs, D)
        return st.numerator, st.weight

    num, wt = jax.vmap(insert, in_axes=(0, 0, 1, 1, 1))(acc.numerator, acc.weight, R_best, vals, ctf2)
    count = acc.count + jnp.zeros_like(acc.count).at[:, half].add(g.T)
    nn = acc.noise_num.at[radius].add(jnp.einsum("bk,bkf,f->f", g, resid2, parseval))
    nd = acc.noise_den.at[radius].add(jnp.sum(valid) * parseval)
    new = _Acc(num, wt, count, nn, nd)
    return new, gamma, R_best, sh_best, log_evidence * valid


# --------------------------------------------------------------------------------------
# init / step
# --------------------------------------------------------------------------------------

def _hash_classes(indices, K: int, seed: int) -> np.ndarray:
    """Deterministic pseudo-random class of each dataset index (balanced in expectation)."""
    rng_keys = (np.asarray(indices, np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed * 7919 + 1))
    with np.errstate(over="ignore"):
        x = rng_keys ^ (rng_keys >> np.uint64(31))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(29))
    return (x % np.uint64(K)).astype(np.int64)


def _lik_weight(fs, noise_psd, max_radius: float, D: int) -> np.ndarray:
    r = np.sqrt((fs.freqs.astype(np.float64) ** 2).sum(-1))
    inside = (r <= max_radius + 1e-6) & (fs.radius > 0)
    psd = np.asarray(noise_psd, np.float64)[np.minimum(fs.radius, len(noise_psd) - 1)]
    return (2 * fs.half_weight * inside / (D * D * np.maximum(psd, 1e-30))).astype(np.float32)


def _run_pass(cfg: ClassificationConfig, source, maps, class_priors, noise_psd, max_radius, rotations, origins,
              estep: bool, progress: bool, desc: str):
    """One pass over the data: E-step (or fixed random assignment) + accumulation."""
    N, D, pix = _source_info(source)
    K = cfg.n_classes
    fs = frequency_set(D)
    F = len(fs.freqs)
    dR, dS, lp = _pose_grid(cfg) if estep else (np.eye(3, dtype=np.float32)[None], np.zeros((1, 2), np.float32),
                                                np.zeros((1, 1), np.float32))
    M, S = len(dR), len(dS)
    # keep the per-batch [B, K, M, F] slice tensor below ~2^24 complex values
    bs = int(max(8, min(cfg.batch_size, 2 ** 24 // max(1, K * M * F), 2 ** 26 // max(1, K * M * S * 64))))
    spectra = jnp.stack([prepare_volume(jnp.asarray(m), cfg.pad_factor).spectrum for m in maps]) if estep else \
        jnp.zeros((K, 1, 1, 1), jnp.complex64)
    lik_w = jnp.asarray(_lik_weight(fs, noise_psd, max_radius, D)) if estep else jnp.zeros(F, jnp.float32)
    log_priors = jnp.log(jnp.maximum(jnp.asarray(class_priors, jnp.float32), 1e-30))
    parseval = jnp.asarray(2 * fs.half_weight)
    hw = jnp.asarray(fs.half_weight)
    acc = _init_acc(K, D, cfg.pad_factor)
    probs = np.zeros((N, K), np.float32)
    new_rot = np.array(rotations, np.float32, copy=True)
    new_org = np.array(origins, np.float32, copy=True)
    total_ll = 0.0
    pose_change = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N, unit="img", desc=desc, leave=False)
    use_ctf = None
    for images, _rb, _ob, c, idx, m, _pix in _padded_batches(source, bs):
        if use_ctf is None:
            use_ctf = c is not None
        pad_idx = np.concatenate([idx, np.repeat(idx[:1], bs - m)])
        R = np.asarray(rotations, np.float32)[pad_idx]
        sh = np.asarray(origin_to_shift(np.asarray(origins, np.float32)[pad_idx]))
        valid = np.zeros(bs, np.float32)
        valid[:m] = 1
        half = random_half(pad_idx, cfg.seed)
        gfix = None
        if not estep:
            gfix = np.eye(K, dtype=np.float32)[_hash_classes(pad_idx, K, cfg.seed)]
        cp = c if c is not None else CTFParams.create(jnp.zeros(bs))
        acc, gamma, R_best, sh_best, lev = _em_batch(
            acc, spectra, jnp.asarray(images), jnp.asarray(R), jnp.asarray(sh), cp, jnp.asarray(valid),
            jnp.asarray(half), None if gfix is None else jnp.asarray(gfix), log_priors, lik_w, parseval, hw,
            jnp.asarray(fs.freqs), jnp.asarray(fs.flat_index), jnp.asarray(fs.radius), jnp.asarray(dR),
            jnp.asarray(dS), jnp.asarray(lp), jnp.float32(pix), box_size=D, pad_factor=cfg.pad_factor,
            ctf_sign=cfg.ctf_sign, use_ctf=bool(use_ctf), estep=estep)
        gamma = np.asarray(gamma)[:m]
        probs[idx] = gamma
        total_ll += float(np.sum(np.asarray(lev)))
        if estep and (M > 1 or S > 1):
            kb = gamma.argmax(1)
            Rb = np.asarray(R_best)[np.arange(m), kb]
            sb = np.asarray(sh_best)[np.arange(m), kb]
            cosang = np.clip((np.einsum("bij,bij->b", Rb, R[:m]) - 1) / 2, -1, 1)
            pose_change.append(np.degrees(np.arccos(cosang)))
            new_rot[idx] = Rb
            new_org[idx] = -sb
        if bar is not None:
            bar.update(m)
    if bar is not None:
        bar.close()
    mpc = float(np.mean(np.concatenate(pose_change))) if pose_change else 0.0
    return acc, probs, new_rot, new_org, total_ll, mpc, pix


def _finalize_classes(cfg: ClassificationConfig, acc: _Acc, D: int, pixel_size: float):
    maps, halves, fscs, res = [], [], [], []
    for k in range(cfg.n_classes):
        st = ReconstructionState(acc.numerator[k], acc.weight[k], acc.count[k], D, cfg.pad_factor)
        if float(jnp.sum(acc.count[k])) < 1e-3:
            z = np.zeros((D, D, D), np.float32)
            maps.append(z)
            halves.append(np.stack([z, z]))
            fscs.append(np.zeros(D // 2, np.float32))
            res.append(np.inf)
            continue
        r = finalize_reconstruction(st, pixel_size, tau2_fudge=cfg.tau2_fudge)
        maps.append(r.volume)
        halves.append(r.half_maps)
        fscs.append(r.fsc_unmasked)
        res.append(r.resolution_0143)
    return np.stack(maps), np.stack(halves), np.stack(fscs).astype(np.float32), np.asarray(res, np.float64)


def _noise_from_acc(acc: _Acc, D: int) -> np.ndarray:
    num, den = np.asarray(acc.noise_num, np.float64), np.asarray(acc.noise_den, np.float64)
    psd = num / np.maximum(den, 1e-30) / (D * D)
    psd[0] = psd[1]
    good = den > 0
    if not good.all():  # shells without frequencies (none inside Nyquist): nearest neighbour
        psd[~good] = psd[good][-1]
    return psd.astype(np.float32)


def _shell_of_fsc(curve, threshold=0.143) -> int:
    c = np.asarray(curve)
    below = np.nonzero(c[1:] < threshold)[0]
    return int(below[0] + 1) if len(below) else len(c)


def init_classification(source, config: ClassificationConfig = ClassificationConfig(), *,
                        progress: bool = False) -> ClassificationState:
    """Initial state: class maps reconstructed from K random disjoint subsets of the images
    (given poses), equal priors, noise spectrum from the residuals of the images against the
    mean initial map, resolution limit ``initial_resolution_in_angstroms``.

    Args:
        source: a ``jaxhet.io.ParticleDataset`` or ``jaxhet.inference.ArrayDataset`` (anything with
            ``batches(batch_size, shuffle=False)`` yielding ParticleBatch-like objects and
            ``__len__``), with poses.
        config: :class:`ClassificationConfig`.
    """
    cfg = config
    N, D, pix = _source_info(source)
    K = int(cfg.n_classes)
    if K < 1:
        raise ValueError("n_classes must be >= 1")
    rot0 = np.zeros((N, 3, 3), np.float32)
    org0 = np.zeros((N, 2), np.float32)
    for b in source.batches(cfg.batch_size, shuffle=False):
        rot0[b.indices] = b.rotations
        org0[b.indices] = b.origin_in_pixels
    if not np.isfinite(rot0).all():
        from jaxhet._errors import JaxhetInputError
        raise JaxhetInputError("classification needs poses (the particles have none; run refine/abinitio first)")
    acc, _, _, _, _, _, pix = _run_pass(cfg, source, None, np.full(K, 1.0 / K), None, 0.0, rot0, org0,
                                        estep=False, progress=progress, desc="init (random subsets)")
    maps, halves, fscs, _ = _finalize_classes(cfg, acc, D, pix)
    r0 = max(2.0, D * pix / cfg.initial_resolution_in_angstroms)
    # noise spectrum: residual power of the images against the mean of the initial maps
    # (at the given poses); the images' own power spectrum would count the signal as noise
    cfg1 = cfg._replace(n_classes=1, local_search_in_degrees=0.0, shift_search_in_pixels=0.0)
    acc1 = _run_pass(cfg1, source, maps.mean(0, keepdims=True), np.ones(1), _noise_from_acc(acc, D), D / 2, rot0,
                     org0, estep=True, progress=progress, desc="init (noise)")[0]
    psd = _noise_from_acc(acc1, D)
    return ClassificationState(maps=maps, half_maps=halves, class_priors=np.full(K, 1.0 / K, np.float32),
                               noise_psd=psd, max_radius=float(min(r0, D / 2)), fsc=fscs, rotations=rot0,
                               origin_in_pixels=org0, class_probs=np.full((N, K), 1.0 / K, np.float32),
                               iteration=0, pixel_size=float(pix))


def classification_step(state: ClassificationState, source, config: ClassificationConfig = ClassificationConfig(), *,
                        progress: bool = False) -> tuple[ClassificationState, ClassificationStats]:
    """One EM iteration: E-step over all images (class x local pose), M-step (class maps,
    priors, noise spectrum), resolution-limit update and re-seeding of empty classes.

    Pure in the sense of optax: the new state is a function of (state, data, config).
    """
    cfg = config
    N, D, pix = _source_info(source)
    K = cfg.n_classes
    acc, probs, rot, org, ll, mpc, _ = _run_pass(cfg, source, state.maps, state.class_priors, state.noise_psd,
                                                 state.max_radius, state.rotations, state.origin_in_pixels,
                                                 estep=True, progress=progress,
                                                 desc=f"classify it {state.iteration + 1}")
    maps, halves, fscs, res = _finalize_classes(cfg, acc, D, state.pixel_size)
    sizes = probs.sum(0)
    priors = (sizes / max(sizes.sum(), 1e-30)).astype(np.float32)
    psd = _noise_from_acc(acc, D)
    # resolution limit: best class FSC(0.143) + increment, never decreasing
    r_fsc = max(_shell_of_fsc(f) for f in fscs)
    max_radius = float(min(D / 2, max(state.max_radius, r_fsc + cfg.resolution_increment_in_shells)))
    sizes_before = sizes.copy()
    reseeded = []
    threshold = cfg.min_class_fraction * N / K
    for k in np.argsort(sizes):
        if sizes[k] >= threshold or K < 2:
            continue
        j = int(np.argmax(sizes))
        if j == k or sizes[j] < 2 * threshold:
            break
        maps[k], maps[j] = halves[j][0], halves[j][1]
        halves[k] = halves[j].copy()
        fscs[k] = fscs[j]
        pj = priors[j] + priors[k]
        priors[k], priors[j] = pj / 2, pj / 2
        sizes[k], sizes[j] = sizes[j] / 2, sizes[j] / 2
        reseeded.append(int(k))
    prev = state.class_probs.argmax(1)
    changed = float(np.mean(prev != probs.argmax(1))) if state.iteration > 0 else 1.0
    new = ClassificationState(maps=maps.astype(np.float32), half_maps=halves.astype(np.float32),
                              class_priors=priors, noise_psd=psd, max_radius=max_radius, fsc=fscs, rotations=rot,
                              origin_in_pixels=org, class_probs=probs, iteration=state.iteration + 1,
                              pixel_size=state.pixel_size)
    stats = ClassificationStats(log_likelihood=ll, changed_fraction=changed,
                                class_sizes=sizes_before.astype(np.float32),
                                resolution=res, max_radius=state.max_radius, reseeded=reseeded,
                                mean_pose_change_in_degrees=mpc)
    return new, stats


# --------------------------------------------------------------------------------------
# checkpoints and the driver
# --------------------------------------------------------------------------------------

def save_classification_state(path: str, state: ClassificationState, config: ClassificationConfig) -> None:
    """Write a state (and its config) to an ``.npz`` atomically."""
    save_state_npz(path, state, config)


def load_classification_state(path: str) -> tuple[ClassificationState, ClassificationConfig]:
    """Read a state written by :func:`save_classification_state`."""
    return load_state_npz(path, ClassificationState, ClassificationConfig)


def classify(source, n_classes: int = 2, n_iterations: int = 20, *, config: ClassificationConfig | None = None,
             checkpoint: str | None = None, progress: bool = False, log=None,
             tol_changed: float = 0.0) -> tuple[ClassificationState, list]:
    """Run 3D classification: :func:`init_classification` then ``n_iterations`` x
    :func:`classification_step`.

    Args:
        source: particles with poses (``jaxhet.io.ParticleDataset`` or ``jaxhet.inference.ArrayDataset``).
        n_classes: K (ignored if ``config`` is given).
        n_iterations: EM iterations.
        config: :class:`ClassificationConfig` (default: K = n_classes, given poses).
        checkpoint: ``.npz`` path; the state is written after every iteration, and an
            existing checkpoint with the same config is resumed.
        progress: tqdm bars; log: callable receiving a one-line summary per iteration.
        tol_changed: stop early once fewer than this fraction of images changes class
            and the resolution limit stopped growing.

    Returns:
        (final state, list of :class:`ClassificationStats`).

    Example:
        >>> ds = ParticleDataset(read_particles("particles.star"))
        >>> state, hist = classify(ds, n_classes=2, n_iterations=15)
        >>> state.class_probs.argmax(1)     # most likely class of each image
    """
    cfg = config or ClassificationConfig(n_classes=int(n_classes))
    state = None
    if checkpoint and os.path.exists(checkpoint):
        st, c0 = load_classification_state(checkpoint)
        if c0 == cfg and len(st.class_probs) == len(source):
            state = st
            if log:
                log(f"resuming from {checkpoint} at iteration {state.iteration}")
    if state is None:
        state = init_classification(source, cfg, progress=progress)
        if checkpoint:
            save_classification_state(checkpoint, state, cfg)
    history = []
    while state.iteration < n_iterations:
        state, stats = classification_step(state, source, cfg, progress=progress)
        history.append(stats)
        if checkpoint:
            save_classification_state(checkpoint, state, cfg)
        if log:
            log(f"iter {state.iteration:3d}  r_max {stats.max_radius:5.1f} sh  logL {stats.log_likelihood:.6g}  "
                f"changed {stats.changed_fraction:.4f}  sizes {np.round(stats.class_sizes).astype(int).tolist()}  "
                f"res {np.round(stats.resolution, 1).tolist()} A"
                + (f"  reseeded {stats.reseeded}" if stats.reseeded else "")
                + (f"  pose change {stats.mean_pose_change_in_degrees:.2f} deg"
                   if stats.mean_pose_change_in_degrees else ""))
        if tol_changed > 0 and stats.changed_fraction < tol_changed and state.max_radius <= stats.max_radius:
            break  # assignments stable and the resolution limit stopped growing
    return state, history
