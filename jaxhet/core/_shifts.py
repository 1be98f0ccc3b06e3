"""In-plane translations as Fourier phase factors.

Translating an image by (sx, sy) pixels (its content moves by +s) multiplies its DFT by
``exp(-2 pi i (kx sx + ky sy) / D)``, k in cycles per box (CONVENTIONS.md). A RELION
origin o means the particle centre sits at box centre MINUS o: the model image of a
particle with origin o is the centred projection translated by ``s = -o``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Complex, Float

from ._fourier import irfft2_centered, rfft2_centered
from ._slicing import image_frequencies

__all__ = ["shift_phase", "shift_image", "origin_to_shift"]


def shift_phase(freqs_2d: Float[Array, "... 2"], shift_in_pixels: Float[Array, "2"], box_size: int) -> Complex[Array, "..."]:
    """Phase factor translating an image by ``shift_in_pixels`` = (sx, sy).

    Args:
        freqs_2d: [..., 2] (kx, ky) in cycles per box.
        shift_in_pixels: (sx, sy); positive sx moves content towards larger x.
        box_size: D.
    """
    s = jnp.asarray(shift_in_pixels)
    phase = -2.0 * jnp.pi * (freqs_2d[..., 0] * s[0] + freqs_2d[..., 1] * s[1]) / box_size
    return jnp.exp(1j * phase)  # complex64 for float32 inputs, complex128 under x64


def shift_image(image: Float[Array, "y x"], shift_in_pixels: Float[Array, "2"]) -> Float[Array, "y x"]:
    """Translate a real image by a (sub-pixel) shift via its Fourier transform."""
    D = image.shape[-1]
    k = jnp.asarray(image_frequencies(D, "half"))
    return irfft2_centered(rfft2_centered(image) * shift_phase(k, shift_in_pixels, D), D)


def origin_to_shift(origin_in_pixels: Float[Array, "... 2"]) -> Float[Array, "... 2"]:
    """RELION origin (rlnOriginX/Y in px) -> translation applied to the centred projection."""
    return -jnp.asarray(origin_in_pixels)
