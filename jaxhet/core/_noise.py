"""Noise: white Gaussian noise at a given SNR, radial noise-PSD estimation, whitening,
and the Gaussian log-likelihood of an image given a model image.

SNR follows CryoBench: ``SNR = var(clean images) / sigma^2`` with the signal variance taken
over the whole clean box (all pixels of all images).

Fourier conventions: images in the *half* layout [D, D//2+1] (``rfft2_centered``). A noise
PSD is expressed as the per-pixel real-space variance it corresponds to, so white noise of
variance sigma^2 has PSD == sigma^2 at every frequency, and

    log p(I | M) = -1/2 sum_k w_k |I_k - M_k|^2 / (D^2 PSD_k) - 1/2 sum_k w_k log(2 pi PSD_k)

with ``w`` the half-plane Parseval weights (:func:`half_plane_weights`); for white noise this
equals the real-space ``sum_x -(I - M)^2 / (2 sigma^2) - n/2 log(2 pi sigma^2)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex, Float

from ._fourier import half_frequency_grid_2d, half_plane_weights, rfft2_centered

__all__ = ["noise_sigma_for_snr", "add_white_noise", "half_radial_index", "estimate_noise_psd",
           "psd_to_half_grid", "whiten", "gaussian_log_likelihood", "gaussian_log_likelihood_real"]


def noise_sigma_for_snr(clean_images: Float[Array, "n y x"], snr: float) -> Array:
    """Noise standard deviation giving ``var(clean) / sigma^2 = snr`` (whole box)."""
    return jnp.sqrt(jnp.var(clean_images) / snr)


def add_white_noise(key: Array, clean_images: Float[Array, "n y x"], sigma) -> Float[Array, "n y x"]:
    """Add i.i.d. Gaussian noise of standard deviation ``sigma`` per pixel."""
    return clean_images + sigma * jax.random.normal(key, clean_images.shape, clean_images.dtype)


def half_radial_index(box_size: int) -> np.ndarray:
    """Integer radius of each half-layout frequency, [D, D//2+1]."""
    k = half_frequency_grid_2d(box_size)
    return np.round(np.sqrt((k ** 2).sum(-1))).astype(np.int32)


def estimate_noise_psd(images: Float[Array, "n y x"], mask: Float[Array, "y x"] | None = None) -> Float[Array, "s"]:
    """Radially averaged noise power spectrum [D//2+1] (per-pixel variance units).

    Args:
        images: noise-only images, or particle images with ``mask`` = 1 on the
            background (solvent) and 0 on the particle; masked images are rescaled by the
            mask's fill fraction.

    Returns:
        PSD per integer shell, normalised so that white noise of variance sigma^2 gives
        sigma^2 in every shell.
    """
    D = images.shape[-1]
    x = images if mask is None else images * mask
    frac = 1.0 if mask is None else jnp.mean(jnp.asarray(mask) ** 2)
    x = x - jnp.mean(x, axis=(-2, -1), keepdims=True) * (1.0 if mask is None else jnp.asarray(mask))
    f = rfft2_centered(x)
    p = jnp.mean(jnp.abs(f) ** 2, axis=0) / (D * D) / frac
    r = jnp.asarray(half_radial_index(D)).ravel()
    w = jnp.asarray(half_plane_weights(D)).ravel()
    n = D // 2 + 1
    keep = (r < n) & (r > 0)
    idx = jnp.where(keep, r, 0)
    num = jnp.zeros(n).at[idx].add(jnp.where(keep, w * p.ravel(), 0))
    den = jnp.zeros(n).at[idx].add(jnp.where(keep, w, 0))
    psd = num / jnp.maximum(den, 1e-12)
    return psd.at[0].set(psd[1])


def psd_to_half_grid(psd: Float[Array, "s"], box_size: int) -> Float[Array, "d dh"]:
    """Expand a radial PSD [D//2+1] to the half-layout grid (radii beyond Nyquist clamp)."""
    r = np.minimum(half_radial_index(box_size), box_size // 2)
    return jnp.asarray(psd)[r]


def whiten(images: Float[Array, "n y x"], psd: Float[Array, "s"]) -> Float[Array, "n y x"]:
    """Divide each image's spectrum by sqrt(PSD): coloured noise becomes unit white noise."""
    from ._fourier import irfft2_centered
    D = images.shape[-1]
    f = rfft2_centered(images) / jnp.sqrt(psd_to_half_grid(psd, D))
    return irfft2_centered(f, D)


def gaussian_log_likelihood(image_ft: Complex[Array, "d dh"], model_ft: Complex[Array, "d dh"],
                            noise_psd: Float[Array, "d dh"] | float, mask: Array | None = None) -> Array:
    """Gaussian log-likelihood of one image (half layout) given the model image.

    Args:
        image_ft, model_ft: ``rfft2_centered`` of the observed and model image.
        noise_psd: per-frequency noise variance (per-pixel units), scalar for white noise.
        mask: optional [D, D//2+1] 0/1 frequency mask (e.g. inside the Nyquist circle).
    """
    D = image_ft.shape[-2]
    w = jnp.asarray(half_plane_weights(D))
    if mask is not None:
        w = w * mask
    psd = jnp.broadcast_to(jnp.asarray(noise_psd, jnp.float32), w.shape)
    r2 = jnp.abs(image_ft - model_ft) ** 2
    return -0.5 * jnp.sum(w * r2 / (D * D * psd)) - 0.5 * jnp.sum(w * jnp.log(2 * jnp.pi * psd))


def gaussian_log_likelihood_real(image: Float[Array, "y x"], model: Float[Array, "y x"], sigma) -> Array:
    """Real-space white-noise Gaussian log-likelihood (reference for the Fourier version)."""
    n = image.size
    return -0.5 * jnp.sum((image - model) ** 2) / sigma ** 2 - 0.5 * n * jnp.log(2 * jnp.pi * sigma ** 2)
