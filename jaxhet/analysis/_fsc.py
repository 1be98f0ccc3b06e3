"""Fourier shell correlation, resolution at a threshold, and FSC-AUC.

    FSC(r) = Re sum_{|k| in shell r} F1(k) F2(k)* / sqrt(sum |F1|^2 sum |F2|^2)

Shells are integer radii ``round(|k|)`` of the centred 3D DFT, r = 0 .. D//2 - 1, at
spatial frequency ``r / D`` cycles per pixel (``r / (D a)`` in 1/A).

FSC-AUC (CryoBench, Jeon et al. 2024): the area under the FSC curve against frequency in
cycles/pixel, from 0 to Nyquist (trapezoid rule, as ``sklearn.metrics.auc`` on
cryoDRGN's ``pixres`` column): a perfect map scores ~0.5. ``normalized=True`` divides by
the Nyquist frequency 0.5, so a perfect map scores ~1.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fsc", "fsc_frequencies", "fsc_resolution", "fsc_auc", "map_fsc_auc"]


def _shells(D: int) -> np.ndarray:
    f = np.arange(D) - D // 2
    r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    return np.round(r).astype(np.int64)


def fsc(map1, map2, mask=None) -> np.ndarray:
    """FSC curve [D//2] between two real maps [D, D, D] (optionally both multiplied by mask)."""
    a = np.asarray(map1, np.float64)
    b = np.asarray(map2, np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"fsc: maps must be the same 3D shape, got {a.shape} and {b.shape}")
    if mask is not None:
        m = np.asarray(mask, np.float64)
        a, b = a * m, b * m
    D = a.shape[-1]
    fa = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(a)))
    fb = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(b)))
    r = _shells(D).ravel()
    n = D // 2
    keep = r < n
    num = np.bincount(r[keep], (fa * fb.conj()).real.ravel()[keep], minlength=n)
    da = np.bincount(r[keep], (np.abs(fa) ** 2).ravel()[keep], minlength=n)
    db = np.bincount(r[keep], (np.abs(fb) ** 2).ravel()[keep], minlength=n)
    return num / np.sqrt(np.maximum(da * db, 1e-300))


def fsc_frequencies(box_size: int, pixel_size: float | None = None) -> np.ndarray:
    """Shell frequencies [D//2]: cycles/pixel, or 1/A when pixel_size is given."""
    f = np.arange(box_size // 2) / box_size
    return f / pixel_size if pixel_size else f


def fsc_resolution(curve: np.ndarray, pixel_size: float, threshold: float = 0.143) -> float:
    """Resolution (A) where the FSC first falls below ``threshold`` (linear interpolation).

    Returns the Nyquist resolution ``2 * pixel_size`` if it never does.
    """
    c = np.asarray(curve)
    D = 2 * len(c)
    freqs = fsc_frequencies(D)
    below = np.nonzero(c < threshold)[0]
    below = below[below > 0]
    if len(below) == 0:
        return 2.0 * pixel_size
    i = below[0]
    f0, f1, c0, c1 = freqs[i - 1], freqs[i], c[i - 1], c[i]
    f = f0 + (c0 - threshold) * (f1 - f0) / (c0 - c1) if c0 != c1 else f1
    return float(pixel_size / f)


def fsc_auc(curve: np.ndarray, normalized: bool = False) -> float:
    """Area under an FSC curve against cycles/pixel up to Nyquist (CryoBench FSC-AUC)."""
    c = np.asarray(curve, np.float64)
    x = fsc_frequencies(2 * len(c))  # r / D for r = 0 .. D/2 - 1, as cryoDRGN's pixres
    area = float(np.trapezoid(c, x)) if hasattr(np, "trapezoid") else float(np.trapz(c, x))
    return area / 0.5 if normalized else area


def map_fsc_auc(map1, map2, mask=None, normalized: bool = False) -> float:
    """FSC-AUC of a map against a (ground-truth) map."""
    return fsc_auc(fsc(map1, map2, mask), normalized)
