"""Multi-body refinement (Nakane et al. 2018; survey §2.3) and the analysis of the body
motions (RELION's ``relion_flex_analyse``).

Model (:class:`jaxhet.models.MultiBodyModel`): the molecule is a sum of rigid bodies
``V_b`` (consensus map x user mask b), each moved per image by a rigid motion
``theta_ib = (omega_ib [deg], t_ib [A])`` about its centre of mass ``c_b``, relative to the
consensus pose ``(A_i, s_i)``. Body b's model image (half-layout DFT, CTF c_i) is

    P_ib(theta) = c_i T_{s_i} F_b'(A_i^T k; theta)   (the moved body through render_fourier)

Iteration (as RELION's multi-body refinement):

1. For every image and body (in turn, Gauss-Seidel, ``sweeps`` passes), the other bodies'
   CTF'd projections are subtracted,
   ``Y_ib = Y_i - sum_{b' != b} P_ib'(theta_ib')``, and ``theta_ib`` is refined against
   ``Y_ib`` by maximising the posterior

       E(theta) = 1/2 sum_{0<|f|<=r_t} w_f |Y_ibf - P_ibf(theta)|^2 / (D^2 sigma^2(|f|))
                  + 1/2 |omega|^2 / sigma_rot^2 + 1/2 |t|^2 / sigma_t^2

   first by a local search over rotations (grid of ``local_search_in_degrees``, step
   ``local_step_in_degrees``, about the current motion), then by Levenberg-Marquardt
   (Gauss-Newton) steps on all six parameters, with the Jacobian from ``jax.jacfwd``
   through the differentiable forward model (the composition of
   :func:`jaxhet.core.render_fourier`: rotated frequencies, the moved body's transform
   :func:`jaxhet.models.rigid_body_fourier`, CTF, shift phase). The
   translation along the viewing direction is invisible in one image; the Gaussian prior
   keeps it at the prior mean.
2. Per-body reconstructions: the partially subtracted images (with the new motions) are
   backprojected at each body's effective pose (``A_i R_ib``, in-plane shift
   ``s_i + (A_i (c_b + t_ib - R_ib c_b))_xy``) through the reconstruction engine (gold-
   standard halves, Wiener filter) and multiplied by the body's mask.
3. The noise spectrum is re-estimated from the full residuals and the resolution limit
   ``r_t`` grows with the bodies' half-map FSC (0.143) plus an increment.

Flexibility analysis (:func:`motion_pca`, :func:`component_movie`): principal components
of the stacked motions ``[omega_1, t_1, omega_2, t_2, ...]`` (degrees and A, centred, as
relion_flex_analyse), each image's coordinates along them (the latents), and map series
(the sum of moved bodies) along each component between the 5th and 95th percentiles.

References: Nakane, Kimanius, Lindahl & Scheres (2018) eLife 7:e36861; Nakane & Scheres
(2021) Methods Mol. Biol. 2215:145.
"""

from __future__ import annotations

import os
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhet.core._slicing import _trilinear_corners
from jaxhet.core import CTFParams, ctf as ctf_fn, local_rotation_grid, matrix_to_axis_angle, origin_to_shift, \
    prepare_volume, rfft2_centered, rotate_image_frequencies, shift_phase
from jaxhet.models._multibody import MultiBodyModel, body_centers, body_image_poses, motion_matrices

from ._checkpoint import load_state_npz, save_state_npz
from ._classify import _padded_batches, _source_info
from ._reconstruct import ReconstructionState, backproject_slices, finalize_reconstruction, frequency_set, \
    random_half, reconstruct

__all__ = ["MultiBodyConfig", "MultiBodyState", "MultiBodyStats", "MotionPCA", "init_multibody", "multibody_step",
           "multibody_refine", "refine_body_motions_batch", "motion_pca", "component_movie", "mask_from_atoms",
           "multibody_model", "save_multibody_state", "load_multibody_state"]


class MultiBodyConfig(NamedTuple):
    """Settings of multi-body refinement.

    Attributes:
        sigma_rotation_in_degrees: prior sd of each rotation-vector component.
        sigma_translation_in_angstroms: prior sd of each translation component.
        local_search_in_degrees: range of the rotation grid search about the current
            motion (0: Gauss-Newton only).
        local_step_in_degrees: its spacing.
        gauss_newton_steps: Levenberg-Marquardt iterations per image, body and sweep.
        sweeps: Gauss-Seidel passes over the bodies per iteration (each body refined
            against the image minus the other bodies at their newest motions).
        estimator: "map": grid maximum then Gauss-Newton to the posterior mode (RELION);
            "mean": posterior mean of the rotation over the local grid (shrinks noisy
            low-SNR estimates), followed by the Gauss-Newton steps if any.
        initial_resolution_in_angstroms: first resolution limit.
        resolution_increment_in_shells: r_{t+1} = max(r_t, r_FSC + increment).
        max_resolution_in_angstroms: never compare beyond this resolution (None: Nyquist);
            useful when the bodies are not really rigid, so that their high-resolution
            detail, though well measured, does not match any one image.
        update_body_maps: reconstruct the bodies every iteration (False: keep them).
        pad_factor, batch_size, ctf_sign, seed (half sets), tau2_fudge: as for
            reconstruction.
    """

    sigma_rotation_in_degrees: float = 10.0
    sigma_translation_in_angstroms: float = 4.0
    local_search_in_degrees: float = 10.0
    local_step_in_degrees: float = 5.0
    gauss_newton_steps: int = 5
    sweeps: int = 2
    estimator: str = "map"
    initial_resolution_in_angstroms: float = 20.0
    resolution_increment_in_shells: int = 3
    max_resolution_in_angstroms: float | None = None
    update_body_maps: bool = True
    pad_factor: int = 2
    batch_size: int = 128
    ctf_sign: str = "relion"
    seed: int = 0
    tau2_fudge: float = 1.0


class MultiBodyState(NamedTuple):
    """State of multi-body refinement (numpy; saved as npz).

    Attributes:
        body_maps: [B, D, D, D] current bodies (masked reconstructions).
        masks: [B, D, D, D] soft masks.
        centers: [B, 3] rotation centres (A, x y z from the box centre).
        consensus: [D, D, D] consensus map.
        motions: [N, B, 6] per image and body: rotation vector (deg), translation (A).
        noise_psd: [D//2 + 1] noise variance per shell.
        max_radius: resolution limit (shells).
        fsc: [B, D//2] half-map FSC of each body reconstruction.
        iteration: completed iterations.
        pixel_size: A.
    """

    body_maps: np.ndarray
    masks: np.ndarray
    centers: np.ndarray
    consensus: np.ndarray
    motions: np.ndarray
    noise_psd: np.ndarray
    max_radius: float
    fsc: np.ndarray
    iteration: int
    pixel_size: float


class MultiBodyStats(NamedTuple):
    """Per-step diagnostics: ``objective`` (sum of E over images and bodies, at the new
    motions), ``motion_rms`` [B, 2] (rms rotation angle in degrees and translation in A),
    ``resolution`` [B] (A), ``max_radius`` used."""

    objective: float
    motion_rms: np.ndarray
    resolution: np.ndarray
    max_radius: float


# --------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------

def mask_from_atoms(coords_in_angstroms, box_size: int, pixel_size: float, atom_radius_in_angstroms: float = 3.0,
                    extend_in_pixels: float = 1.0, soft_edge_in_pixels: float = 3.0) -> np.ndarray:
    """Soft body mask [D, D, D] from atom positions (RELION ``mask_create`` on a model map).

    The atoms are drawn as Gaussians of sd ``atom_radius / 2``, thresholded at 10 % of
    the density an isolated atom has at its centre, extended and given a raised-cosine
    edge (:func:`jaxhet.analysis.solvent_mask`).
    """
    from jaxhet.analysis import solvent_mask
    from jaxhet.core import gaussian_atoms_volume

    xyz = jnp.asarray(np.asarray(coords_in_angstroms, np.float32))
    sig = atom_radius_in_angstroms / 2
    v = np.asarray(gaussian_atoms_volume(xyz, jnp.ones(len(xyz)), sig, box_size, pixel_size))
    peak = (pixel_size / (np.sqrt(2 * np.pi) * sig)) ** 3
    return solvent_mask(v, pixel_size, lowpass_in_angstroms=2 * pixel_size, threshold=0.1 * peak,
                        extend_in_pixels=extend_in_pixels, soft_edge_in_pixels=soft_edge_in_pixels)


# --------------------------------------------------------------------------------------
# the per-batch refinement (jitted)
# --------------------------------------------------------------------------------------

def _moved_body_fourier(spectra_flat, P: int, b, pixel_size, center, motion, k):
    """:func:`jaxhet.models.rigid_body_fourier` of body ``b`` (a traced index) of stacked,
    flattened spectra [n_bodies * P^3]: one compiled code path serves every body."""
    R = motion_matrices(motion[:3])
    q = k @ R
    idx, w = _trilinear_corners(q * (P * pixel_size), P)
    F = jnp.sum(jnp.take(spectra_flat, idx + b * (P ** 3), mode="clip") * w, axis=-1)
    d = center + motion[3:] - R @ center
    return F * jnp.exp(-2j * jnp.pi * (k @ d))


def _body_image(spectra_flat, P, b, center, motion, A, s, c, freqs, pixel_size, D):
    """CTF'd, shifted projection [F] of moved body b at image frequencies ``freqs`` [F, 2]
    (cycles per box): the forward model ``c T_s F_b'(A^T k)`` of :func:`jaxhet.core.render_fourier`,
    evaluated only at the compared frequencies."""
    k3 = rotate_image_frequencies(freqs / (D * pixel_size), A)
    f = _moved_body_fourier(spectra_flat, P, b, pixel_size, center, motion, k3)
    return c * f * shift_phase(freqs, s, D)


def refine_body_motions_batch(spectra, centers, y, c, rotations, shifts, motions, lik_weight, freqs, dR,
                              prior_precision, *, box_size: int, pad_factor: int, pixel_size, gauss_newton_steps: int,
                              sweeps: int = 2, estimator: str = "map"):
    """Refine every body's motion in a batch against the partially subtracted images.

    Args:
        spectra: [B_bodies, P, P, P] prepared body maps; centers: [B_bodies, 3] (A).
        y: [n, F] image DFTs at the compared frequencies ``freqs`` [F, 2] (cycles per box);
            c: [n, F] CTFs there.
        rotations: [n, 3, 3]; shifts: [n, 2] px (consensus poses).
        motions: [n, B_bodies, 6] current motions (deg, A).
        lik_weight: [F] likelihood weights ``w_f / (D^2 sigma^2(|f|))``.
        dR: [M, 3, 3] local rotation grid (M = 1: no grid search).
        prior_precision: [6] 1/sigma^2 of (omega, t).
        sweeps: passes over the bodies; within a pass the bodies are refined in turn
            (Gauss-Seidel: body b sees the other bodies at their newest motions).
        estimator: "map" (grid maximum, then Gauss-Newton to the posterior mode) or "mean"
            (posterior mean of the rotation over the grid, then Gauss-Newton steps if any).

    Returns:
        (new motions [n, B_bodies, 6], objective E at them [n, B_bodies]).
    """
    D = box_size
    nb, P = spectra.shape[0], spectra.shape[-1]
    flat = spectra.reshape(-1)
    sqrt_w = jnp.sqrt(lik_weight)
    lam = prior_precision

    def render(b, th, A, s, ci):
        return _body_image(flat, P, b, centers[b], th, A, s, ci, freqs, pixel_size, D)

    def energy(b, th, target, A, s, ci):
        r = target - render(b, th, A, s, ci)
        return 0.5 * jnp.sum(lik_weight * (r.real ** 2 + r.imag ** 2)) + 0.5 * jnp.sum(lam * th * th)

    def one_image(yi, ci, A, s, th_all):
        proj = jax.vmap(lambda b, th: render(b, th, A, s, ci))(jnp.arange(nb), th_all)  # [nb, F]

        def update(i, carry):
            th_all, e_all, proj = carry
            b = i % nb
            target = yi - (jnp.sum(proj, 0) - proj[b])
            th0 = th_all[b]
            if dR.shape[0] > 1:  # local search over rotations about the current one
                Rc = motion_matrices(th0[:3])
                cand_w = jnp.rad2deg(matrix_to_axis_angle(jnp.einsum("ij,mjk->mik", Rc, dR)))  # [M, 3]
                cands = jnp.concatenate([cand_w, jnp.broadcast_to(th0[3:], (cand_w.shape[0], 3))], -1)
                es = jax.vmap(lambda th: energy(b, th, target, A, s, ci))(cands)
                if estimator == "mean":  # posterior mean over the grid (prior included)
                    p = jax.nn.softmax(-es)
                    th0 = jnp.concatenate([jnp.sum(p[:, None] * cand_w, 0), th0[3:]])
                else:
                    th0 = cands[jnp.argmin(es)]
            e0 = energy(b, th0, target, A, s, ci)

            def lm(carry, _):  # Levenberg-Marquardt on the six parameters
                th, e, mu = carry
                f = render(b, th, A, s, ci)
                J = jax.jacfwd(lambda t: render(b, t, A, s, ci))(th)  # [F, 6] complex
                G = J * sqrt_w[:, None]
                r = (target - f) * sqrt_w
                H = (jnp.conj(G).T @ G).real + jnp.diag(lam)
                g = -(jnp.conj(G).T @ r).real + lam * th
                step = -jnp.linalg.solve(H + mu * jnp.diag(jnp.diag(H)) + 1e-9 * jnp.eye(6), g)
                th_new = th + step
                e_new = energy(b, th_new, target, A, s, ci)
                ok = e_new < e
                return (jnp.where(ok, th_new, th), jnp.where(ok, e_new, e), jnp.where(ok, mu * 0.3, mu * 10.0)), None

            (th, e, _), _ = jax.lax.scan(lm, (th0, e0, jnp.float32(1e-3)), None, length=gauss_newton_steps)
            return th_all.at[b].set(th), e_all.at[b].set(e), proj.at[b].set(render(b, th, A, s, ci))

        th_all, e_all, _ = jax.lax.fori_loop(0, sweeps * nb, update, (th_all, jnp.zeros(nb, jnp.float32), proj))
        return th_all, e_all

    return jax.vmap(one_image)(y, c, rotations, shifts, motions)


class _Acc(NamedTuple):
    numerator: jax.Array  # [nb, 2, P, P, P]
    weight: jax.Array     # [nb, 2, P, P, P]
    count: jax.Array      # [nb, 2]
    noise_num: jax.Array
    noise_den: jax.Array


@partial(jax.jit, static_argnames=("box_size", "pad_factor", "ctf_sign", "use_ctf", "gauss_newton_steps", "sweeps",
                                   "estimator", "refine", "accumulate"), donate_argnums=(0,))
def _mb_batch(acc, spectra, centers, images, rotations, shifts, ctf_params, valid, half, motions, lik_weight_cmp,
              sub, parseval, hw, freqs, flat_index, radius, dR, prior_precision, pixel_size, *, box_size, pad_factor,
              ctf_sign, use_ctf, gauss_newton_steps, sweeps, estimator, refine, accumulate):
    D = box_size
    nb = spectra.shape[0]
    y = jax.vmap(lambda im: rfft2_centered(im).reshape(-1)[flat_index])(images)
    k_phys = freqs / (D * pixel_size)
    c = jax.vmap(lambda cp: ctf_fn(cp, k_phys, ctf_sign))(ctf_params) if use_ctf else jnp.ones(y.shape, jnp.float32)
    if refine:  # compare only inside the resolution limit: the subset ``sub`` of the frequencies
        motions, energies = refine_body_motions_batch(
            spectra, centers, y[:, sub], c[:, sub], rotations, shifts, motions, lik_weight_cmp, freqs[sub], dR,
            prior_precision, box_size=D, pad_factor=pad_factor, pixel_size=pixel_size,
            gauss_newton_steps=gauss_newton_steps, sweeps=sweeps, estimator=estimator)
    else:
        energies = jnp.zeros(motions.shape[:2])

    P = spectra.shape[-1]
    flat = spectra.reshape(-1)

    def projections(A, s, ci, th_all):
        return jax.vmap(lambda b, th: _body_image(flat, P, b, centers[b], th, A, s, ci, freqs, pixel_size, D))(
            jnp.arange(nb), th_all)

    proj = jax.vmap(projections)(rotations, shifts, c, motions)  # [n, nb, F]
    total = jnp.sum(proj, 1)
    resid = y - total
    nn = acc.noise_num.at[radius].add(jnp.einsum("n,nf,f->f", valid, resid.real ** 2 + resid.imag ** 2, parseval))
    nd = acc.noise_den.at[radius].add(jnp.sum(valid) * parseval)
    if not accumulate:
        return acc._replace(noise_num=nn, noise_den=nd), motions, energies * valid[:, None]
    targets = y[:, None] - (total[:, None] - proj)  # [n, nb, F] other bodies subtracted
    eff_rot, eff_shift = jax.vmap(lambda th, A, s: body_image_poses(th, centers, A, s, pixel_size))(
        motions, rotations, shifts)  # [n, nb, 3, 3], [n, nb, 2]
    phi = jax.vmap(jax.vmap(lambda s: shift_phase(freqs, s, D)))(eff_shift)  # [n, nb, F]
    g = valid[:, None, None]
    vals = hw * c[:, None] * jnp.conj(phi) * targets * g
    ctf2 = hw * (c * c)[:, None] * g * jnp.ones((1, nb, 1))

    def insert(num, wt, R, v, w2):
        st = backproject_slices(ReconstructionState(num, wt, jnp.zeros(2), D, pad_factor), R, v, w2, half, freqs, D)
        return st.numerator, st.weight

    num, wt = jax.vmap(insert, in_axes=(0, 0, 1, 1, 1))(acc.numerator, acc.weight, eff_rot, vals, ctf2)
    count = acc.count + jnp.zeros_like(acc.count).at[:, half].add(jnp.broadcast_to(valid, (nb, valid.shape[0])))
    return _Acc(num, wt, count, nn, nd), motions, energies * valid[:, None]


# --------------------------------------------------------------------------------------
# init / step / driver
# --------------------------------------------------------------------------------------

def _lik_weight(fs, noise_psd, max_radius, D):
    from ._classify import _lik_weight as lw
    return lw(fs, noise_psd, max_radius, D)


def _noise(acc, D):
    from ._classify import _noise_from_acc
    return _noise_from_acc(acc, D)


def _pass(cfg: MultiBodyConfig, source, state: MultiBodyState, refine: bool, accumulate: bool, progress: bool,
          desc: str):
    N, D, pix = _source_info(source)
    nb = len(state.body_maps)
    fs = frequency_set(D)
    P = D * cfg.pad_factor
    spectra = jnp.stack([prepare_volume(jnp.asarray(m), cfg.pad_factor).spectrum for m in state.body_maps])
    if cfg.local_search_in_degrees > 0:
        dR = local_rotation_grid(cfg.local_search_in_degrees, cfg.local_step_in_degrees)
    else:
        dR = np.eye(3, dtype=np.float32)[None]
    lam = np.array([1 / cfg.sigma_rotation_in_degrees ** 2] * 3 + [1 / cfg.sigma_translation_in_angstroms ** 2] * 3,
                   np.float32)
    lw_all = _lik_weight(fs, state.noise_psd, state.max_radius, D)
    sub = np.nonzero(lw_all > 0)[0]  # the compared frequencies (0 < |k| <= r_t): few early on
    lik_w = jnp.asarray(lw_all[sub])
    shape = (nb, 2, P, P, P) if accumulate else (nb, 2, 1, 1, 1)
    acc = _Acc(jnp.zeros(shape, jnp.complex64), jnp.zeros(shape, jnp.float32), jnp.zeros((nb, 2)),
               jnp.zeros(D // 2 + 1), jnp.zeros(D // 2 + 1))
    motions = np.array(state.motions, np.float32, copy=True)
    energy = 0.0
    bs = cfg.batch_size
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N, unit="img", desc=desc, leave=False)
    for images, R, org, c, idx, m, _p in _padded_batches(source, bs):
        pad_idx = np.concatenate([idx, np.repeat(idx[:1], bs - m)])
        valid = np.zeros(bs, np.float32)
        valid[:m] = 1
        cp = c if c is not None else CTFParams.create(jnp.zeros(bs))
        acc, new_mot, e = _mb_batch(
            acc, spectra, jnp.asarray(state.centers), jnp.asarray(images), jnp.asarray(R),
            jnp.asarray(origin_to_shift(org)), cp, jnp.asarray(valid), jnp.asarray(random_half(pad_idx, cfg.seed)),
            jnp.asarray(motions[pad_idx]), lik_w, jnp.asarray(sub), jnp.asarray(2 * fs.half_weight),
            jnp.asarray(fs.half_weight),
            jnp.asarray(fs.freqs), jnp.asarray(fs.flat_index), jnp.asarray(fs.radius), jnp.asarray(dR),
            jnp.asarray(lam), jnp.float32(pix), box_size=D, pad_factor=cfg.pad_factor, ctf_sign=cfg.ctf_sign,
            use_ctf=c is not None, gauss_newton_steps=int(cfg.gauss_newton_steps), sweeps=int(cfg.sweeps),
            estimator=cfg.estimator, refine=refine,
            accumulate=accumulate)
        motions[idx] = np.asarray(new_mot)[:m]
        energy += float(np.sum(np.asarray(e)))
        if bar is not None:
            bar.update(m)
    if bar is not None:
        bar.close()
    return acc, motions, energy


def init_multibody(source, masks, consensus=None, config: MultiBodyConfig = MultiBodyConfig(), *, centers=None,
                   noise_psd=None, normalize_overlap: bool = True, progress: bool = False) -> MultiBodyState:
    """Initial state: consensus map (reconstructed from the given poses unless passed),
    bodies = consensus x masks, centres of mass, zero motions, and the noise spectrum of the
    residuals against the consensus.

    Args:
        source: particles with consensus poses (``ParticleDataset`` or ``ArrayDataset``).
        masks: [B, D, D, D] soft masks (values in [0, 1]) on the images' grid.
        consensus: optional [D, D, D] consensus map.
        config: :class:`MultiBodyConfig`.
        centers: optional [B, 3] rotation centres (A) instead of the centres of mass.
        noise_psd: optional [D//2 + 1] noise spectrum instead of the estimate.
        normalize_overlap: divide the masks by ``max(1, sum_b mask_b)`` so overlapping
            soft edges do not count the consensus density twice (the bodies then sum to
            the consensus at zero motion).
    """
    N, D, pix = _source_info(source)
    masks = np.asarray(masks, np.float32)
    if masks.ndim != 4 or masks.shape[1:] != (D, D, D):
        raise ValueError(f"masks must be [n_bodies, {D}, {D}, {D}], got {masks.shape}")
    if normalize_overlap:  # where soft masks overlap, share the density: sum_b mask_b <= 1
        masks = masks / np.maximum(1.0, masks.sum(0, keepdims=True))
    if consensus is None:
        consensus = reconstruct(source, batch_size=cfg_batch(config), pad_factor=config.pad_factor,
                                seed=config.seed, ctf_sign=config.ctf_sign, progress=progress).volume
    consensus = np.asarray(consensus, np.float32)
    bodies = consensus[None] * masks
    cen = body_centers(bodies, pix) if centers is None else np.asarray(centers, np.float32)
    nb = len(masks)
    state = MultiBodyState(body_maps=bodies, masks=masks, centers=cen, consensus=consensus,
                           motions=np.zeros((N, nb, 6), np.float32), noise_psd=np.ones(D // 2 + 1, np.float32),
                           max_radius=float(min(D / 2, max(2.0, D * pix / config.initial_resolution_in_angstroms),
                                                D * pix / (config.max_resolution_in_angstroms or 2 * pix))),
                           fsc=np.zeros((nb, D // 2), np.float32), iteration=0, pixel_size=float(pix))
    if noise_psd is None:
        acc, _, _ = _pass(config, source, state, refine=False, accumulate=False, progress=progress, desc="noise")
        noise_psd = _noise(acc, D)
    return state._replace(noise_psd=np.asarray(noise_psd, np.float32))


def cfg_batch(cfg: MultiBodyConfig) -> int:
    return int(cfg.batch_size)


def _shell_of_fsc(curve, threshold=0.143) -> int:
    c = np.asarray(curve)
    below = np.nonzero(c[1:] < threshold)[0]
    return int(below[0] + 1) if len(below) else len(c)


def multibody_step(state: MultiBodyState, source, config: MultiBodyConfig = MultiBodyConfig(), *,
                   progress: bool = False) -> tuple[MultiBodyState, MultiBodyStats]:
    """One iteration: refine every image's body motions (signal subtraction, local search,
    Gauss-Newton), reconstruct the bodies, update the noise and the resolution limit."""
    cfg = config
    N, D, pix = _source_info(source)
    acc, motions, energy = _pass(cfg, source, state, refine=True, accumulate=cfg.update_body_maps, progress=progress,
                                 desc=f"multibody it {state.iteration + 1}")
    nb = len(state.body_maps)
    body_maps, fscs, res = state.body_maps, state.fsc, np.full(nb, np.nan)
    if cfg.update_body_maps:
        maps, fl = [], []
        for b in range(nb):
            st = ReconstructionState(acc.numerator[b], acc.weight[b], acc.count[b], D, cfg.pad_factor)
            r = finalize_reconstruction(st, state.pixel_size, tau2_fudge=cfg.tau2_fudge, mask=state.masks[b])
            maps.append(r.volume * state.masks[b])
            fl.append(r.fsc_masked)
            res[b] = r.resolution_0143
        body_maps, fscs = np.stack(maps).astype(np.float32), np.stack(fl).astype(np.float32)
        r_fsc = max(_shell_of_fsc(f) for f in fscs)
        max_radius = float(min(D / 2, max(state.max_radius, r_fsc + cfg.resolution_increment_in_shells)))
    else:
        max_radius = state.max_radius
    if cfg.max_resolution_in_angstroms:
        max_radius = float(min(max_radius, D * state.pixel_size / cfg.max_resolution_in_angstroms))
    psd = _noise(acc, D)
    ang = np.degrees(np.linalg.norm(np.radians(motions[..., :3]), axis=-1))
    rms = np.stack([np.sqrt(np.mean(ang ** 2, 0)), np.sqrt(np.mean(np.sum(motions[..., 3:] ** 2, -1), 0))], -1)
    new = state._replace(body_maps=body_maps, motions=motions, noise_psd=psd, max_radius=max_radius, fsc=fscs,
                         iteration=state.iteration + 1)
    return new, MultiBodyStats(energy, rms.astype(np.float32), res, state.max_radius)


def save_multibody_state(path: str, state: MultiBodyState, config: MultiBodyConfig) -> None:
    """Write a state (and its config) to an ``.npz`` atomically."""
    save_state_npz(path, state, config)


def load_multibody_state(path: str) -> tuple[MultiBodyState, MultiBodyConfig]:
    """Read a state written by :func:`save_multibody_state`."""
    return load_state_npz(path, MultiBodyState, MultiBodyConfig)


def multibody_refine(source, masks, consensus=None, n_iterations: int = 5, *, config: MultiBodyConfig | None = None,
                     checkpoint: str | None = None, progress: bool = False, log=None,
                     centers=None, normalize_overlap: bool = True) -> tuple[MultiBodyState, list]:
    """Multi-body refinement driver: :func:`init_multibody`, then ``n_iterations`` x
    :func:`multibody_step`, with a checkpoint after each iteration (resumed when it exists
    and matches).

    Example:
        >>> state, hist = multibody_refine(ParticleDataset(table), masks, n_iterations=5)
        >>> pca = motion_pca(state.motions)
        >>> pca.latents[:, 0]          # each image's coordinate on the first motion component
    """
    cfg = config or MultiBodyConfig()
    masks = np.asarray(masks, np.float32)
    if normalize_overlap:
        masks = masks / np.maximum(1.0, masks.sum(0, keepdims=True))
    state = None
    if checkpoint and os.path.exists(checkpoint):
        st, c0 = load_multibody_state(checkpoint)
        if c0 == cfg and len(st.motions) == len(source) and np.array_equal(st.masks, np.asarray(masks, np.float32)):
            state = st
            if log:
                log(f"resuming from {checkpoint} at iteration {state.iteration}")
    if state is None:
        state = init_multibody(source, masks, consensus, cfg, centers=centers, normalize_overlap=False,
                               progress=progress)
        if checkpoint:
            save_multibody_state(checkpoint, state, cfg)
    hist = []
    while state.iteration < n_iterations:
        state, stats = multibody_step(state, source, cfg, progress=progress)
        hist.append(stats)
        if checkpoint:
            save_multibody_state(checkpoint, state, cfg)
        if log:
            log(f"iter {state.iteration:3d}  r_max {stats.max_radius:5.1f} sh  E {stats.objective:.6g}  "
                f"rms motion (deg, A) {np.round(stats.motion_rms, 2).tolist()}  "
                f"res {np.round(stats.resolution, 1).tolist()} A")
    return state, hist


# --------------------------------------------------------------------------------------
# flexibility analysis
# --------------------------------------------------------------------------------------

class MotionPCA(NamedTuple):
    """PCA of the stacked body motions: ``mean`` [B*6], ``components`` [C, B*6] (unit rows),
    ``explained_variance`` [C], ``explained_variance_ratio`` [C], ``latents`` [N, C]."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    latents: np.ndarray


def motion_pca(motions, n_components: int | None = None) -> MotionPCA:
    """Principal components of per-image body motions [N, B, 6] (deg, A), as
    relion_flex_analyse: centred, unscaled; the sign of each component is fixed so that its
    largest-magnitude entry is positive."""
    X = np.asarray(motions, np.float64).reshape(len(motions), -1)
    mu = X.mean(0)
    Xc = X - mu
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    var = s ** 2 / max(len(X) - 1, 1)
    C = Vt.shape[0] if n_components is None else min(int(n_components), Vt.shape[0])
    Vt = Vt[:C]
    sign = np.sign(Vt[np.arange(C), np.abs(Vt).argmax(1)])
    Vt = Vt * sign[:, None]
    tot = var.sum() if var.sum() > 0 else 1.0
    return MotionPCA(mu.astype(np.float32), Vt.astype(np.float32), var[:C].astype(np.float32),
                     (var[:C] / tot).astype(np.float32), (Xc @ Vt.T).astype(np.float32))


def multibody_model(state: MultiBodyState, pad_factor: int | None = None) -> MultiBodyModel:
    """The :class:`jaxhet.models.MultiBodyModel` of a state (its bodies and centres)."""
    nb, D = state.body_maps.shape[:2]
    return MultiBodyModel(D, state.pixel_size, n_bodies=nb, pad_factor=pad_factor or 2, body_maps=state.body_maps,
                          centers_in_angstroms=state.centers, rngs=__import__("flax").nnx.Rngs(0))


def component_movie(model: MultiBodyModel, pca: MotionPCA, component: int, n_frames: int = 10,
                    percentiles: tuple[float, float] = (5.0, 95.0)) -> tuple[np.ndarray, np.ndarray]:
    """Maps along one principal component of the motions.

    Args:
        model: the multi-body model (bodies and centres).
        pca: from :func:`motion_pca`.
        component: 0-based component index.
        n_frames: maps in the series.
        percentiles: range of the latent coordinate covered (of the images' values).

    Returns:
        (maps [n_frames, D, D, D], latent values [n_frames]).
    """
    z = pca.latents[:, component]
    lo, hi = np.percentile(z, percentiles)
    vals = np.linspace(lo, hi, n_frames).astype(np.float32)
    vol = jax.jit(model.volume)
    maps = [np.asarray(vol(jnp.asarray(pca.mean + v * pca.components[component]))) for v in vals]
    return np.stack(maps), vals
