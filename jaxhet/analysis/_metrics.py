"""Ground-truth metrics and map alignment: FSC-AUC per state / per image, rigid alignment
of a map to a reference (rotation, translation, handedness), and FSC curve output (text,
PNG).

Alignment (:func:`align_maps`): both maps are Fourier-cropped to a small box and low-passed
to ``search_resolution_in_angstroms``; for each handedness, every rotation of a global
SO(3) grid is applied in Fourier space (the spectrum of the rotated map is the original's
sampled at ``Q^T k``, on a pad-2 gridding-corrected grid) and the best translation comes
from the FFT cross-correlation; the best few are refined on finer local grids (the last
ones on the full box); the final transform is applied to the full-resolution map by
cubic-spline interpolation (:func:`rotate_volume`) and a Fourier phase shift (sub-pixel
peak). Mirror: ``V(x, y, -z)``.

FSC-AUC (CryoBench, Jeon et al. 2024): area under the FSC against frequency in
cycles/pixel up to Nyquist (:func:`jaxhet.analysis.fsc_auc`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhet.core import axis_angle_to_matrix, fft3_centered, ifft3_centered, so3_grid
from jaxhet.core._fourier import fourier_crop_3d, pad_volume
from jaxhet.core._slicing import _sinc2_correction, gather_trilinear

from ._fsc import fsc_frequencies, fsc_resolution, map_fsc_auc
from ._masks import lowpass_filter

__all__ = [
    "mirror_volume", "rotate_volume", "translate_volume", "AlignmentResult", "align_maps",
    "per_state_fsc_auc", "per_image_fsc_auc", "save_fsc_plot", "write_fsc_text",
]


def mirror_volume(volume) -> np.ndarray:
    """Handedness flip ``V(x, y, -z)`` about the centre voxel D//2."""
    v = np.asarray(volume)
    D = v.shape[0]
    f = np.flip(v, 0)
    return np.roll(f, 1, 0) if D % 2 == 0 else f


def _padded_spectrum(volume, pad: int = 2):
    v = jnp.asarray(volume, jnp.float32)
    D = v.shape[-1]
    P = pad * D
    return fft3_centered(pad_volume(v / jnp.asarray(_sinc2_correction(D, P)), P))


def _grid_k(D: int):
    f = jnp.arange(D) - D // 2
    kz, ky, kx = jnp.meshgrid(f, f, f, indexing="ij")
    return jnp.stack([kx, ky, kz], -1).astype(jnp.float32)


def _rotated_spectrum(spec_padded, Q, D: int):
    """Centred D-grid spectrum of the map rotated by Q: F(Q^T k)."""
    P = spec_padded.shape[-1]
    k = _grid_k(D)
    coords = jnp.einsum("zyxi,ij->zyxj", k, Q) * (P / D)  # (Q^T k)_j = sum_i k_i Q_ij
    return gather_trilinear(spec_padded, coords)


def rotate_volume(volume, rotation, order: int = 3) -> np.ndarray:
    """The map rotated by Q (density at x moves to Q x): ``W(x) = V(Q^T x)`` about the centre
    voxel D//2, by cubic-spline interpolation (exact for Q = identity)."""
    from scipy import ndimage
    v = np.asarray(volume, np.float64)
    D = v.shape[-1]
    Qt = np.asarray(rotation, np.float64).T
    M = Qt[::-1, ::-1]  # (x, y, z) -> array order (z, y, x)
    c = np.full(3, D // 2, np.float64)
    out = ndimage.affine_transform(v, M, offset=c - M @ c, order=order, mode="constant", cval=0.0)
    return out.astype(np.float32)


def translate_volume(volume, shift_xyz_in_pixels) -> np.ndarray:
    """Translate a map by (sx, sy, sz) pixels (content moves by +s), via a Fourier phase."""
    v = np.asarray(volume, np.float64)
    D = v.shape[-1]
    f = np.arange(D) - D // 2
    s = np.asarray(shift_xyz_in_pixels, np.float64)
    ph = np.exp(-2j * np.pi * (f[None, None, :] * s[0] + f[None, :, None] * s[1] + f[:, None, None] * s[2]) / D)
    F = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(v)))
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(F * ph))).real.astype(np.float32)


def _ball_grid(max_deg: float, step_deg: float) -> np.ndarray:
    n = int(round(max_deg / step_deg))
    g = np.arange(-n, n + 1) * np.deg2rad(step_deg)
    v = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return v[np.linalg.norm(v, axis=-1) <= np.deg2rad(max_deg) + 1e-9].astype(np.float32)


class AlignmentResult(NamedTuple):
    """aligned map [D, D, D]; rotation Q [3, 3] and shift (x, y, z) px applied after the
    optional mirror (aligned = T_shift R_Q mirror?(map)); mirrored flag; score =
    normalised cross-correlation at the search resolution."""

    aligned: np.ndarray
    rotation: np.ndarray
    shift_in_pixels: np.ndarray
    mirrored: bool
    score: float


@partial(jax.jit, static_argnames=("d",))
def _score_rotations(spec_pad, ref_ft, Qs, d):
    """For rotations Qs [M, 3, 3]: max over translations of the cross-correlation, and argmax."""
    def one(Q):
        F = _rotated_spectrum(spec_pad, Q, d)
        cc = ifft3_centered(jnp.conj(F) * ref_ft).real  # sum_x ref(x + t) rot(x): peak at the shift t
        norm = jnp.sqrt(jnp.sum(jnp.abs(F) ** 2))
        i = jnp.argmax(cc)
        return cc.reshape(-1)[i] / norm, i
    return jax.lax.map(one, Qs, batch_size=16)


def _prep_small(volume, d: int, pixel_size: float, res: float):
    v = np.asarray(volume, np.float32)
    D = v.shape[-1]
    F = fourier_crop_3d(fft3_centered(jnp.asarray(v)), d) if d < D else fft3_centered(jnp.asarray(v))
    small = np.asarray(ifft3_centered(F).real, np.float32)
    return lowpass_filter(small, pixel_size * D / small.shape[-1], res)


def align_maps(volume, reference, pixel_size: float = 1.0, *, search_resolution_in_angstroms: float | None = None,
               search_box: int = 32, global_step_in_degrees: float = 15.0, allow_mirror: bool = True,
               n_candidates: int = 4) -> AlignmentResult:
    """Rigidly align ``volume`` to ``reference`` (rotation, translation, and handedness).

    Args:
        volume, reference: maps [D, D, D] with the same box and pixel size.
        pixel_size: A per voxel.
        search_resolution_in_angstroms: low-pass for the search (default 4 x the
            search box's pixel size).
        search_box: Fourier-crop both maps to this box for the search.
        global_step_in_degrees: SO(3) grid spacing of the global search.
        allow_mirror: also try the mirror image (ab initio maps may have either hand).
        n_candidates: best global rotations refined locally.

    Returns:
        :class:`AlignmentResult` (the aligned full-resolution map and the transform).
    """
    v = np.asarray(volume, np.float32)
    ref = np.asarray(reference, np.float32)
    if v.shape != ref.shape or v.ndim != 3:
        raise ValueError(f"align_maps: maps must have the same 3D shape, got {v.shape} and {ref.shape}")
    D = v.shape[-1]
    d = min(search_box, D)
    ps = pixel_size * D / d
    res = 4.0 * ps if search_resolution_in_angstroms is None else search_resolution_in_angstroms
    ref_s = _prep_small(ref, d, pixel_size, res)
    ref_ft = fft3_centered(jnp.asarray(ref_s))
    ref_norm = float(np.sqrt(np.sum(np.abs(np.asarray(ref_ft)) ** 2)))
    grid, _ = so3_grid(global_step_in_degrees)
    best = None
    for mirrored in ((False, True) if allow_mirror else (False,)):
        vv = mirror_volume(v) if mirrored else v
        spec = _padded_spectrum(_prep_small(vv, d, pixel_size, res))
        sc, _ = _score_rotations(spec, ref_ft, jnp.asarray(grid), d)
        sc = np.asarray(sc)
        cands = [grid[i] for i in np.argsort(-sc)[:n_candidates]]
        for Q0 in cands:
            Q = Q0
            for rng_deg, step in ((global_step_in_degrees, global_step_in_degrees / 4), (3.0, 0.75)):
                vecs = _ball_grid(rng_deg, step)
                Qs = np.einsum("ij,mjk->mik", Q, np.asarray(axis_angle_to_matrix(jnp.asarray(vecs))))
                s2, idx = _score_rotations(spec, ref_ft, jnp.asarray(Qs, jnp.float32), d)
                s2 = np.asarray(s2)
                j = int(np.argmax(s2))
                Q = Qs[j]
                score, flat = float(s2[j]), int(np.asarray(idx)[j])
            if best is None or score > best[0]:
                best = (score, Q, flat, mirrored)
    score, Q, flat, mirrored = best
    # shift at the search box -> full box (cross-correlation peak index -> shift of the content)
    z, y, x = np.unravel_index(flat, (d, d, d))
    shift = (np.array([x, y, z], np.float64) - d // 2) * (D / d)
    vv = mirror_volume(v) if mirrored else v
    if d < D:  # final local refinement of the rotation on the full box
        spec_full = _padded_spectrum(vv)
        ref_full = fft3_centered(jnp.asarray(ref))
        for rng_deg, step in ((1.0, 0.25), (0.25, 0.0625)):
            vecs = _ball_grid(rng_deg, step)
            Qs = np.einsum("ij,mjk->mik", Q, np.asarray(axis_angle_to_matrix(jnp.asarray(vecs))))
            s2, _ = _score_rotations(spec_full, ref_full, jnp.asarray(Qs, jnp.float32), D)
            Q = Qs[int(np.argmax(np.asarray(s2)))]
    rot = rotate_volume(vv, Q)
    # refine the translation at full resolution (integer peak of the full-box correlation)
    Fr = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(rot)))
    Fref = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(ref)))
    cc = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(Fr.conj() * Fref))).real
    peak = np.unravel_index(int(np.argmax(cc)), cc.shape)
    sub = []
    for ax in range(3):  # parabolic sub-pixel peak along each axis
        lo, hi = list(peak), list(peak)
        lo[ax] = (peak[ax] - 1) % D
        hi[ax] = (peak[ax] + 1) % D
        cm, c0, cp = cc[tuple(lo)], cc[peak], cc[tuple(hi)]
        den = cm - 2 * c0 + cp
        sub.append(0.5 * (cm - cp) / den if den < 0 else 0.0)
    z, y, x = np.array(peak, np.float64) + np.array(sub)
    shift_full = np.array([x, y, z], np.float64) - D // 2
    if np.linalg.norm(shift_full - shift) > 2 * D / d + 1:  # trust the search-box estimate if they disagree
        shift_full = shift
    aligned = translate_volume(rot, shift_full)
    return AlignmentResult(aligned, np.asarray(Q, np.float32), shift_full.astype(np.float32), bool(mirrored),
                           score / max(ref_norm, 1e-30))


def per_state_fsc_auc(maps, ground_truth_maps, mask=None, normalized: bool = False) -> np.ndarray:
    """FSC-AUC of each state's map against its ground truth, [S] (CryoBench per-state metric)."""
    maps = list(maps)
    gts = list(ground_truth_maps)
    if len(maps) != len(gts):
        raise ValueError(f"per_state_fsc_auc: {len(maps)} maps for {len(gts)} ground-truth maps")
    return np.array([map_fsc_auc(m, g, mask, normalized) for m, g in zip(maps, gts)])


def per_image_fsc_auc(map_for_image, labels, ground_truth_maps, indices=None, mask=None,
                      normalized: bool = False) -> np.ndarray:
    """CryoBench per-image FSC-AUC: the map a method gives for image i (from its latent)
    against the ground truth of image i's conformation.

    Args:
        map_for_image: callable ``i -> map [D, D, D]`` (e.g. decode image i's latent).
        labels: [N] ground-truth state (index into ``ground_truth_maps``) of every image.
        ground_truth_maps: sequence of maps, or callable ``label -> map``.
        indices: the images to evaluate (default all; CryoBench samples a subset).
        mask: optional real-space mask applied to both maps.

    Returns:
        [len(indices)] FSC-AUC values (average them for the CryoBench number).
    """
    labels = np.asarray(labels)
    idx = np.arange(len(labels)) if indices is None else np.asarray(indices)
    gt = ground_truth_maps if callable(ground_truth_maps) else (lambda lab: ground_truth_maps[int(lab)])
    return np.array([map_fsc_auc(map_for_image(int(i)), gt(labels[i]), mask, normalized) for i in idx])


def write_fsc_text(path, curves: dict, pixel_size: float, box_size: int) -> None:
    """Write FSC curves as columns: shell, 1/A, resolution (A), then one column per curve."""
    n = box_size // 2
    f = fsc_frequencies(box_size, pixel_size)
    names = list(curves)
    with open(path, "w") as fh:
        fh.write("# shell  freq_1_over_A  resolution_A  " + "  ".join(names) + "\n")
        for i in range(n):
            res = 1.0 / f[i] if f[i] > 0 else float("inf")
            vals = "  ".join(f"{float(curves[k][i]): .5f}" for k in names)
            fh.write(f"{i:5d}  {f[i]:.6f}  {res:10.3f}  {vals}\n")


def save_fsc_plot(path, curves: dict, pixel_size: float, title: str = "") -> None:
    """PNG of FSC curves against 1/A with the 0.5 and 0.143 thresholds and resolutions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = next(iter(curves.values()))
    D = 2 * len(first)
    f = fsc_frequencies(D, pixel_size)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        r = fsc_resolution(c, pixel_size, 0.143)
        ax.plot(f, c, label=f"{name} ({r:.2f} A @0.143)")
    ax.axhline(0.5, ls="--", c="gray", lw=0.8)
    ax.axhline(0.143, ls=":", c="gray", lw=0.8)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0, f[-1])
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
