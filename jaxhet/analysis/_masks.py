"""Maps filters and masks: Fourier low-pass, soft solvent masks (RELION ``relion_mask_create``).

A solvent mask is made by (1) low-pass filtering the map (default 15 A), (2) thresholding
it, (3) extending the binary mask by ``extend_in_pixels`` and (4) adding a raised-cosine
soft edge of ``soft_edge_in_pixels``:

    m(x) = 1                                   if d(x) <= 0
         = (1 + cos(pi d(x) / w)) / 2          if 0 < d(x) < w
         = 0                                   otherwise

with d the Euclidean distance to the (extended) binary mask. With no threshold given,
it is ``max(background mean + 4 background sd, 0.05 * max)`` of the low-passed map, the
background being the voxels outside the sphere of radius 0.45 D.

Reference: RELION ``relion_mask_create`` (Scheres 2012); Chen et al. (2013)
Ultramicroscopy 135:24 (masked FSC).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["lowpass_filter", "solvent_mask", "auto_threshold"]


def _radius_cycles_per_box(D: int) -> np.ndarray:
    f = np.arange(D) - D // 2
    return np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)


def lowpass_filter(volume, pixel_size: float, resolution_in_angstroms: float, edge_width_in_shells: float = 2.0) -> np.ndarray:
    """Raised-cosine Fourier low-pass of a map [D, D, D] to ``resolution_in_angstroms``.

    Frequencies below ``D a / res - w/2`` shells are kept, above ``+ w/2`` removed.
    """
    v = np.asarray(volume, np.float64)
    D = v.shape[-1]
    r0 = D * pixel_size / resolution_in_angstroms
    r = _radius_cycles_per_box(D)
    w = max(edge_width_in_shells, 1e-6)
    t = np.clip((r - (r0 - w / 2)) / w, 0.0, 1.0)
    filt = 0.5 * (1 + np.cos(np.pi * t))
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(v)))
    out = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f * filt))).real
    return out.astype(np.float32)


def auto_threshold(lowpassed, background_radius_fraction: float = 0.45) -> float:
    """Threshold ``max(mean_bg + 4 sd_bg, 0.05 max)`` of a (low-passed) map."""
    v = np.asarray(lowpassed, np.float64)
    D = v.shape[-1]
    r = _radius_cycles_per_box(D)
    bg = v[r > background_radius_fraction * D]
    if bg.size < 10:
        bg = v.ravel()
    return float(max(bg.mean() + 4 * bg.std(), 0.05 * v.max()))


def solvent_mask(volume, pixel_size: float, lowpass_in_angstroms: float = 15.0, threshold: float | None = None,
                 extend_in_pixels: float = 3.0, soft_edge_in_pixels: float = 6.0) -> np.ndarray:
    """Soft solvent mask [D, D, D] float32 in [0, 1] (see module docstring).

    Args:
        volume: map [D, D, D].
        pixel_size: A per voxel.
        lowpass_in_angstroms: low-pass before thresholding.
        threshold: binarisation level of the low-passed map (default :func:`auto_threshold`).
        extend_in_pixels: dilation of the binary mask.
        soft_edge_in_pixels: width of the raised-cosine edge.
    """
    lp = lowpass_filter(volume, pixel_size, lowpass_in_angstroms)
    thr = auto_threshold(lp) if threshold is None else float(threshold)
    binary = lp > thr
    if not binary.any():
        return np.ones_like(lp, dtype=np.float32)
    d = ndimage.distance_transform_edt(~binary)  # distance to the nearest mask voxel
    d = d - extend_in_pixels
    w = max(soft_edge_in_pixels, 1e-6)
    t = np.clip(d / w, 0.0, 1.0)
    m = 0.5 * (1 + np.cos(np.pi * t))
    m[d <= 0] = 1.0
    return m.astype(np.float32)
