"""Ab initio map from images without poses: stochastic EM over minibatches (cryoSPARC-style).

Each iteration t draws a random minibatch of B images and

1. E-step: a global search of every image over an SO(3) grid (HEALPix x psi,
   :func:`jaxhet.core.so3_grid`) and optional translations, against the current map,
   comparing only frequencies ``|k| <= r_t`` (the resolution grows from
   ``initial_resolution`` to ``final_resolution`` over the iterations); the posterior
   is tempered by ``beta_t`` (annealed to 1), which keeps early assignments soft;
2. M-step with the *full* posterior: for every grid rotation m the posterior-weighted sums
   ``G_m = sum_i,s p_ism c_i conj(T_s) Y_i`` and ``G2_m = sum_i p_im c_i^2`` are two matrix
   products, inserted once per rotation (:func:`backproject_slices`);
3. the accumulators are exponentially averaged, ``N <- lambda N + G``, ``W <- lambda W + G2``
   (a stochastic-approximation EM; Delyon, Lavielle & Moulines 1999), and the map becomes
   ``N / (W + eps mean_shell W)``, low-passed to ``r_t``, multiplied by a soft spherical
   mask and clipped at zero (a positivity prior on the density, as cryoSPARC's ab initio).

The start is the backprojection of a minibatch at random orientations (a smooth blob with
the particle's radial profile; the random assignment breaks the symmetry). The noise
power per shell starts at the images' total power (an over-estimate, so the first
posteriors are broad) and then follows the residuals at the best pose (running average).

After the minibatch phase, :func:`abinitio` assigns every image by a global search at the
final resolution and finer grid and hands map and poses to :func:`refine` for a few local
gold-standard iterations (``refine_schedule``).

References: Punjani, Rubinstein, Fleet & Brubaker (2017) Nat. Methods 14:290 (cryoSPARC
ab initio, SGD); Scheres (2012) (marginalised likelihood); Delyon et al. (1999) Ann.
Stat. 27:94 (stochastic approximation EM).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhet.core import CTFParams, random_rotations, so3_grid, spherical_mask
from jaxhet.analysis._masks import lowpass_filter

from ._em import (SearchStage, estimate_noise_power, global_pose_search, prepare_reference, reference_slices, refine,
                  resolution_to_radius, RefinementResult)
from ._reconstruct import (_backproject_images_jit, _static_fs, backproject_slices, frequency_set, grid_to_map,
                           init_reconstruction, shell_mean, symmetrized_grids, _padded_shells)

__all__ = ["AbinitioResult", "abinitio_sgd", "assign_poses", "abinitio"]


class AbinitioResult(NamedTuple):
    """volume [D, D, D] after the minibatch phase; rotations [N, 3, 3] and
    origin_in_pixels [N, 2] from the final global assignment (None if not run);
    refinement: :class:`RefinementResult` of the local refinement (None if not run);
    history: per-iteration dicts."""

    volume: np.ndarray
    rotations: np.ndarray | None
    origin_in_pixels: np.ndarray | None
    refinement: RefinementResult | None
    history: list


def _pad(x, n):
    x = np.asarray(x)
    return x if len(x) == n else np.concatenate([x, np.repeat(x[:1], n - len(x), 0)], 0)


def _pad_ctf(c, n):
    return None if c is None else CTFParams(*[_pad(np.asarray(x, np.float32), n) for x in c])


def _current_map(state, D, pf, pix, res, mask, eps=0.1):
    num, w = symmetrized_grids(state)
    n_sh = D // 2
    sh = np.minimum(_padded_shells(D * pf, pf), n_sh - 1)
    reg = jnp.asarray((eps * shell_mean(w[0], pf, n_sh)).astype(np.float32))[jnp.asarray(sh)] + 1e-30
    v = grid_to_map(num[0] / (w[0] + reg), D, True)
    v = lowpass_filter(v, pix, res) * mask
    return np.maximum(v, 0.0).astype(np.float32)


def _image_power(dataset, D, n_images=500, seed=0):
    """Mean per-shell power of the images (per-pixel variance units): an upper bound on the noise."""
    from ._reconstruct import batch_image_ft
    fs = frequency_set(D)
    n_sh = D // 2 + 1
    rad = np.minimum(fs.radius, n_sh - 1)
    wpar = 2 * fs.half_weight
    rows = np.random.default_rng(seed).permutation(len(dataset))[:n_images]
    s = np.zeros(n_sh)
    c = np.zeros(n_sh)
    for b in dataset.batches(256, shuffle=False, indices=np.sort(rows)):
        y = np.asarray(batch_image_ft(jnp.asarray(b.images), _static_fs(D).value))
        s += np.bincount(rad, (np.abs(y) ** 2 * wpar).sum(0), minlength=n_sh)[:n_sh]
        c += len(b.images) * np.bincount(rad, wpar, minlength=n_sh)[:n_sh]
    p = estimate_noise_power(s, c, D)
    p[0] = p[1]
    return p


def abinitio_sgd(dataset, *, n_iterations: int = 60, minibatch_size: int = 300,
                 initial_resolution_in_angstroms: float = 30.0, final_resolution_in_angstroms: float = 12.0,
                 coarse_step_in_degrees: float = 15.0, fine_step_in_degrees: float = 7.5,
                 fine_from_resolution_in_angstroms: float = 18.0, shift_range: float = 0.0, shift_step: float = 1.0,
                 forgetting: float = 0.75, beta_start: float = 0.2, mask_radius_in_pixels: float | None = None,
                 seed: int = 0, ctf_sign: str = "relion", progress: bool = False, callback=None,
                 slice_budget: int = 12_000_000, initial_volume=None, start_iteration: int = 0
                 ) -> tuple[np.ndarray, list]:
    """The minibatch stochastic-EM phase (see module docstring). Returns ``(map, history)``.

    Args:
        dataset: ParticleDataset or ArrayDataset (images of box D, downsample there).
        n_iterations: minibatches.
        minibatch_size: images per minibatch.
        initial_resolution_in_angstroms, final_resolution_in_angstroms: the comparison
            limit grows linearly in frequency between them.
        coarse_step_in_degrees, fine_step_in_degrees: SO(3) grid spacing, switching to
            the fine grid once the limit reaches ``fine_from_resolution_in_angstroms``.
        shift_range, shift_step: translation search (px) around the input origins.
        forgetting: lambda of the running accumulators (memory ~ 1 / (1 - lambda) batches).
        beta_start: initial inverse temperature of the posterior (annealed to 1 over the
            first half of the iterations).
        mask_radius_in_pixels: soft spherical mask (default 0.4 D).
        seed: minibatch sampling and the random start.
        callback: optional ``callback(iteration, info, volume)``.
        slice_budget: max images x shifts x rotations scores per E-step call (memory).
        initial_volume: start from this map instead of the random-orientation blob.
        start_iteration: resume the schedule (resolution, grid, beta) at this iteration
            (with ``initial_volume`` the checkpointed map; the accumulators restart empty).
    """
    N = len(dataset)
    rng = np.random.default_rng(seed)
    first = next(iter(dataset.batches(1, indices=np.arange(1))))
    D = int(np.shape(first.images)[-1])
    pix = float(first.pixel_size_in_angstroms)
    pf = 2
    mask_r = 0.4 * D if mask_radius_in_pixels is None else mask_radius_in_pixels
    mask = spherical_mask(D, mask_r, 4.0)
    r0 = resolution_to_radius(initial_resolution_in_angstroms, D, pix)
    r1 = min(D // 2 - 1, resolution_to_radius(final_resolution_in_angstroms, D, pix))
    noise = _image_power(dataset, D, seed=seed)
    n_sh = D // 2 + 1
    fsf = frequency_set(D)
    rad_full = np.minimum(fsf.radius, n_sh - 1)
    wpar = 2 * fsf.half_weight

    # random start: minibatch backprojected at random orientations
    if initial_volume is None:
        st = init_reconstruction(D, pf)
        rows = np.sort(rng.permutation(N)[:minibatch_size])
        for b in dataset.batches(minibatch_size, indices=rows):
            n = len(b.indices)
            R = np.asarray(random_rotations(jax.random.PRNGKey(seed), n))
            cp = b.ctf if b.ctf is not None else CTFParams.create(jnp.zeros(n))
            st = _backproject_images_jit(st, jnp.asarray(b.images), jnp.asarray(R),
                                         -jnp.asarray(b.origin_in_pixels, jnp.float32), cp, jnp.zeros(n, jnp.int32),
                                         jnp.ones(n), jnp.float32(pix), _static_fs(D), ctf_sign, b.ctf is not None)
        vol = _current_map(st, D, pf, pix, initial_resolution_in_angstroms, mask)
    else:
        vol = np.asarray(initial_volume, np.float32)
    state = init_reconstruction(D, pf)
    history = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_iterations, initial=start_iteration, desc="abinitio", unit="batch")
    res_run = None
    for it in range(start_iteration, n_iterations):
        t0 = time.time()
        frac = it / max(n_iterations - 1, 1)
        rmax = r0 + (r1 - r0) * frac
        res = D * pix / rmax
        beta = beta_start + (1.0 - beta_start) * min(1.0, 2 * frac)
        step = fine_step_in_degrees if res <= fine_from_resolution_in_angstroms else coarse_step_in_degrees
        grid_R, _ = so3_grid(step)
        spec = prepare_reference(vol, pix, None, None, pf)
        slices = reference_slices(spec, grid_R, D, r1)  # fixed band r1: one compilation
        S = 1 if shift_range <= 0 else int(np.pi * (shift_range / shift_step + 0.5) ** 2)
        bsz = int(max(1, min(minibatch_size, slice_budget // (S * len(grid_R)))))
        rows = np.sort(rng.choice(N, size=min(minibatch_size, N), replace=False))
        fs_c = _static_fs(D, r1).value
        kc = jnp.asarray(fs_c.freqs)
        in_band = np.sqrt((fs_c.freqs ** 2).sum(-1)) <= rmax + 1e-6
        hw = jnp.asarray((fs_c.half_weight * in_band).astype(np.float32))
        G_acc = None
        rs = np.zeros(n_sh)
        rc = np.zeros(n_sh)
        maxp = []
        for b in dataset.batches(bsz, indices=rows):
            n = len(b.indices)
            w = np.zeros(bsz, np.float32)
            w[:n] = 1
            out, G, G2 = global_pose_search(spec, grid_R, _pad(b.images, bsz), _pad_ctf(b.ctf, bsz),
                                            -_pad(np.asarray(b.origin_in_pixels, np.float32), bsz), noise, pix, rmax,
                                            shift_range=shift_range, shift_step=shift_step, beta=beta,
                                            ctf_sign=ctf_sign, image_weight=w, aggregate=True, slices=slices,
                                            band_radius=r1)
            G_acc = (G, G2) if G_acc is None else (G_acc[0] + G, G_acc[1] + G2)
            rp = np.asarray(out.residual_power)[:n]
            rs += np.bincount(rad_full, (rp * wpar[None]).sum(0), minlength=n_sh)[:n_sh]
            rc += n * np.bincount(rad_full, wpar, minlength=n_sh)[:n_sh]
            maxp.append(np.asarray(out.max_probability)[:n])
        # M-step: decay and insert the posterior-weighted slices
        state = state._replace(numerator=state.numerator * forgetting, weight=state.weight * forgetting)
        state = backproject_slices(state, jnp.asarray(grid_R), G_acc[0] * hw[None], G_acc[1] * hw[None],
                                   jnp.zeros(len(grid_R), jnp.int32), kc, D)
        vol = _current_map(state, D, pf, pix, res, mask)
        # noise: running average of the residual power at the best pose
        est = estimate_noise_power(rs, rc, D)
        res_run = est if res_run is None else 0.5 * (res_run + est)
        noise = np.minimum(noise, res_run) if it < 2 else res_run
        info = dict(iteration=it + 1, resolution=res, grid_step=step, beta=beta,
                    mean_max_probability=float(np.concatenate(maxp).mean()), seconds=time.time() - t0)
        history.append(info)
        if callback is not None:
            callback(it + 1, info, vol)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(res=f"{res:.1f}A", p=f"{info['mean_max_probability']:.2f}")
    if bar is not None:
        bar.close()
    return vol, history


def assign_poses(dataset, volume, *, resolution_in_angstroms: float, step_in_degrees: float = 7.5,
                 shift_range: float = 0.0, shift_step: float = 1.0, batch_size: int = 256,
                 noise_power=None, ctf_sign: str = "relion", progress: bool = False,
                 slice_budget: int = 12_000_000):
    """Global search of every image against ``volume``: best rotations [N, 3, 3], origins
    [N, 2], max posterior probability [N]."""
    N = len(dataset)
    first = next(iter(dataset.batches(1, indices=np.arange(1))))
    D = int(np.shape(first.images)[-1])
    pix = float(first.pixel_size_in_angstroms)
    rmax = min(D // 2 - 1, resolution_to_radius(resolution_in_angstroms, D, pix))
    noise = _image_power(dataset, D) if noise_power is None else noise_power
    grid_R, _ = so3_grid(step_in_degrees)
    spec = prepare_reference(volume, pix, None, None)
    slices = reference_slices(spec, grid_R, D, rmax)
    S = 1 if shift_range <= 0 else int(np.pi * (shift_range / shift_step + 0.5) ** 2)
    bsz = int(max(1, min(batch_size, slice_budget // (S * len(grid_R)))))
    R = np.zeros((N, 3, 3), np.float32)
    O = np.zeros((N, 2), np.float32)
    P = np.zeros(N, np.float32)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N, unit="img", desc="assign poses")
    for b in dataset.batches(bsz):
        n = len(b.indices)
        out, _, _ = global_pose_search(spec, grid_R, _pad(b.images, bsz), _pad_ctf(b.ctf, bsz),
                                       -_pad(np.asarray(b.origin_in_pixels, np.float32), bsz), noise, pix, rmax,
                                       shift_range=shift_range, shift_step=shift_step, ctf_sign=ctf_sign,
                                       slices=slices)
        R[b.indices] = np.asarray(out.rotations)[:n]
        O[b.indices] = -np.asarray(out.shifts)[:n]
        P[b.indices] = np.asarray(out.max_probability)[:n]
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return R, O, P


def abinitio(dataset, *, sgd_kwargs: dict | None = None, assign_step_in_degrees: float = 7.5,
             refine_schedule: list[SearchStage] | None = None, shift_range: float = 0.0, seed: int = 0,
             ctf_sign: str = "relion", progress: bool = False, callback=None, refine_kwargs: dict | None = None
             ) -> AbinitioResult:
    """Ab initio reconstruction: minibatch stochastic EM, global pose assignment, local refinement.

    Args:
        dataset: ParticleDataset or ArrayDataset.
        sgd_kwargs: keyword arguments of :func:`abinitio_sgd`.
        assign_step_in_degrees: SO(3) grid of the assignment of all images.
        refine_schedule: local :class:`SearchStage` list for :func:`refine` (default: three
            iterations, 6/2, 3/1 and 1.5/0.5 degrees); an empty list skips refinement.
        shift_range: translation search (px) in every stage.
        seed, ctf_sign, progress: as elsewhere.
        callback: ``callback(stage_name, iteration, info)``.
        refine_kwargs: extra keyword arguments of :func:`refine`.
    """
    kw = dict(sgd_kwargs or {})
    kw.setdefault("shift_range", shift_range)
    vol, hist = abinitio_sgd(dataset, seed=seed, ctf_sign=ctf_sign, progress=progress,
                             callback=None if callback is None else (lambda i, info, v: callback("sgd", i, info)),
                             **kw)
    final_res = kw.get("final_resolution_in_angstroms", 12.0)
    R, O, P = assign_poses(dataset, vol, resolution_in_angstroms=final_res, step_in_degrees=assign_step_in_degrees,
                           shift_range=shift_range, ctf_sign=ctf_sign, progress=progress)
    if refine_schedule is None:
        s = max(shift_range / 2, 0.0)
        refine_schedule = [SearchStage("local", 2.0, 6.0, s, 1.0), SearchStage("local", 1.0, 3.0, s / 2, 0.5),
                           SearchStage("local", 0.5, 1.5, s / 4, 0.25)]
    ref = None
    if refine_schedule:
        rk = dict(refine_kwargs or {})
        rk.setdefault("initial_resolution_in_angstroms", final_res)
        ref = refine(dataset, initial_volume=vol, rotations=R, origin_in_pixels=O, schedule=refine_schedule,
                     seed=seed, ctf_sign=ctf_sign, progress=progress,
                     callback=None if callback is None else (lambda i, info, *a: callback("refine", i, info)), **rk)
    return AbinitioResult(vol, R, O, ref, hist)
