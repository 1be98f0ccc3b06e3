"""Centred Fourier transforms, Hartley transform, frequency grids, shells, masks, cropping.

Conventions (CONVENTIONS.md): the centre of a box of size D is index ``D // 2`` on every
axis, in real space and in ``fftshift``-ed Fourier space alike. Frequencies are in cycles
per box (integers); divide by ``D * pixel_size`` for 1/A.

Two Fourier layouts are used for images:

- *centred* ``[D, D]``: ``fftshift(fft2(ifftshift(img)))``, DC at ``[D//2, D//2]``;
- *half* ``[D, D//2 + 1]``: ``rfft2(ifftshift(img))``, the layout of the forward model's
  hot loop (half the work). Row i holds ky = fftfreq(D)[i] * D, column j holds kx = j.

Volumes in Fourier space are always centred ``[D, D, D]`` (index order z, y, x).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex, Float

__all__ = [
    "fft2_centered", "ifft2_centered", "fft3_centered", "ifft3_centered",
    "rfft2_centered", "irfft2_centered", "hartley2", "hartley3", "ihartley2", "ihartley3",
    "freqs_1d", "frequency_grid_2d", "frequency_grid_3d", "half_frequency_grid_2d",
    "radial_index", "radial_average", "shell_sums", "circular_mask", "spherical_mask",
    "soft_circular_mask", "fourier_crop_2d", "fourier_crop_3d", "fourier_pad_3d",
    "downsample_2d", "downsample_3d", "pad_volume", "half_plane_weights",
]


def fft2_centered(x: Float[Array, "*b y x"]) -> Complex[Array, "*b y x"]:
    """Centred 2D FFT over the last two axes."""
    ax = (-2, -1)
    return jnp.fft.fftshift(jnp.fft.fft2(jnp.fft.ifftshift(x, axes=ax)), axes=ax)


def ifft2_centered(f: Complex[Array, "*b y x"]) -> Complex[Array, "*b y x"]:
    """Inverse of :func:`fft2_centered` (complex output; take ``.real`` for real images)."""
    ax = (-2, -1)
    return jnp.fft.fftshift(jnp.fft.ifft2(jnp.fft.ifftshift(f, axes=ax)), axes=ax)


def fft3_centered(v: Float[Array, "z y x"]) -> Complex[Array, "z y x"]:
    """Centred 3D FFT of a map (DC at ``[D//2]*3``)."""
    return jnp.fft.fftshift(jnp.fft.fftn(jnp.fft.ifftshift(v)))


def ifft3_centered(f: Complex[Array, "z y x"]) -> Complex[Array, "z y x"]:
    """Inverse of :func:`fft3_centered` (complex output)."""
    return jnp.fft.fftshift(jnp.fft.ifftn(jnp.fft.ifftshift(f)))


def rfft2_centered(x: Float[Array, "*b y x"]) -> Complex[Array, "*b y xh"]:
    """Real 2D FFT of a centred image into the *half* layout ``[D, D//2+1]``."""
    return jnp.fft.rfft2(jnp.fft.ifftshift(x, axes=(-2, -1)))


def irfft2_centered(f: Complex[Array, "*b y xh"], box_size: int) -> Float[Array, "*b y x"]:
    """Inverse of :func:`rfft2_centered` for a box of size ``box_size``."""
    img = jnp.fft.irfft2(f, s=(box_size, box_size))
    return jnp.fft.fftshift(img, axes=(-2, -1))


def hartley2(x):
    """Centred 2D discrete Hartley transform, H = Re F - Im F (its own inverse up to 1/N)."""
    f = fft2_centered(x)
    return f.real - f.imag


def ihartley2(h):
    n = h.shape[-1] * h.shape[-2]
    return hartley2(h) / n


def hartley3(v):
    """Centred 3D discrete Hartley transform."""
    f = fft3_centered(v)
    return f.real - f.imag


def ihartley3(h):
    return hartley3(h) / h.size


def freqs_1d(box_size: int) -> np.ndarray:
    """Centred integer frequencies ``arange(D) - D//2`` (cycles per box)."""
    return np.arange(box_size) - box_size // 2


def frequency_grid_2d(box_size: int, pixel_size: float | None = None) -> np.ndarray:
    """Centred 2D grid [D, D, 2] of (kx, ky); cycles/box, or 1/A if pixel_size given."""
    f = freqs_1d(box_size).astype(np.float32)
    ky, kx = np.meshgrid(f, f, indexing="ij")
    g = np.stack([kx, ky], -1)
    return g / (box_size * pixel_size) if pixel_size else g


def half_frequency_grid_2d(box_size: int, pixel_size: float | None = None) -> np.ndarray:
    """Half-layout grid [D, D//2+1, 2] of (kx, ky) matching :func:`rfft2_centered`."""
    ky = (np.fft.fftfreq(box_size) * box_size).astype(np.float32)
    kx = np.arange(box_size // 2 + 1, dtype=np.float32)
    KY, KX = np.meshgrid(ky, kx, indexing="ij")
    g = np.stack([KX, KY], -1)
    return g / (box_size * pixel_size) if pixel_size else g


def half_plane_weights(box_size: int) -> np.ndarray:
    """Weights [D, D//2+1] so that sum(w * |F_half|^2) = sum(|F_full|^2) (Parseval).

    Columns with a conjugate partner outside the half plane count twice.
    """
    w = np.full((box_size, box_size // 2 + 1), 2.0, np.float32)
    w[:, 0] = 1.0
    if box_size % 2 == 0:
        w[:, -1] = 1.0
    return w


def frequency_grid_3d(box_size: int, pixel_size: float | None = None) -> np.ndarray:
    """Centred 3D grid [D, D, D, 3] of (kx, ky, kz), index order (z, y, x)."""
    f = freqs_1d(box_size).astype(np.float32)
    kz, ky, kx = np.meshgrid(f, f, f, indexing="ij")
    g = np.stack([kx, ky, kz], -1)
    return g / (box_size * pixel_size) if pixel_size else g


def radial_index(shape: tuple[int, ...]) -> np.ndarray:
    """Integer radius ``round(|k|)`` of each entry of a centred grid of the given shape."""
    axes = [np.arange(n) - n // 2 for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))
    return np.round(r).astype(np.int32)


def shell_sums(x, shape_radius: np.ndarray | None = None, n_shells: int | None = None):
    """Sum of ``x`` over integer-radius shells of a centred grid; returns [n_shells]."""
    r = radial_index(x.shape) if shape_radius is None else shape_radius
    n = int(x.shape[-1] // 2 + 1) if n_shells is None else n_shells
    r = jnp.asarray(r).ravel()
    keep = r < n
    return jnp.zeros(n, x.dtype).at[jnp.where(keep, r, 0)].add(jnp.where(keep, jnp.ravel(x), 0))


def radial_average(x, n_shells: int | None = None):
    """Mean of ``x`` over integer-radius shells of a centred 2D or 3D grid ([D//2+1])."""
    r = radial_index(x.shape)
    n = int(x.shape[-1] // 2 + 1) if n_shells is None else n_shells
    counts = np.bincount(r.ravel(), minlength=n)[:n].astype(np.float32)
    return shell_sums(x, r, n) / np.maximum(counts, 1)


def circular_mask(box_size: int, radius: float | None = None) -> np.ndarray:
    """Boolean disc of radius ``radius`` (default D/2) around the centre, [D, D]."""
    r = box_size / 2 if radius is None else radius
    f = freqs_1d(box_size)
    return (f[:, None] ** 2 + f[None, :] ** 2) <= r * r


def soft_circular_mask(box_size: int, radius: float, width: float) -> np.ndarray:
    """Disc of ``radius`` with a raised-cosine edge of ``width`` pixels, [D, D] float32."""
    f = freqs_1d(box_size).astype(np.float32)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    t = np.clip((r - radius) / max(width, 1e-6), 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


def spherical_mask(box_size: int, radius: float | None = None, soft_width: float = 0.0) -> np.ndarray:
    """Ball (hard, or raised-cosine edge of ``soft_width`` px) around the centre, [D, D, D]."""
    r0 = box_size / 2 if radius is None else radius
    f = freqs_1d(box_size).astype(np.float32)
    r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    if soft_width <= 0:
        return (r <= r0).astype(np.float32)
    t = np.clip((r - r0) / soft_width, 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


def _crop_slices(n: int, m: int) -> slice:
    start = n // 2 - m // 2
    return slice(start, start + m)


def fourier_crop_2d(f, new_size: int):
    """Crop a centred 2D spectrum [..., D, D] to [..., d, d] keeping the centre (DC)."""
    s = _crop_slices(f.shape[-1], new_size)
    return f[..., s, s]


def fourier_crop_3d(f, new_size: int):
    """Crop a centred 3D spectrum [D, D, D] to [d, d, d] keeping the centre (DC)."""
    s = _crop_slices(f.shape[-1], new_size)
    return f[s, s, s]


def fourier_pad_3d(f, new_size: int):
    """Zero-pad a centred 3D spectrum [d, d, d] to [D, D, D] (inverse of cropping)."""
    d = f.shape[-1]
    s = _crop_slices(new_size, d)
    out = jnp.zeros((new_size,) * 3, f.dtype)
    return out.at[s, s, s].set(f)


def downsample_2d(img, new_size: int):
    """Fourier-crop images [..., D, D] -> [..., d, d]. Pixel size grows by D/d.

    The kept Fourier coefficients are unchanged, so the total (summed) intensity is
    conserved: pixel values are "mass per pixel" and grow by (D/d)^2. This is jaxhet's
    normalisation everywhere (a map's DFT values do not depend on the pixel size), so a
    model fit at one box predicts Fourier-cropped images at any smaller box unchanged.
    """
    f = fourier_crop_2d(fft2_centered(img), new_size)
    return ifft2_centered(f).real


def downsample_3d(vol, new_size: int):
    """Fourier-crop a map [D, D, D] -> [d, d, d], conserving mass (see downsample_2d)."""
    f = fourier_crop_3d(fft3_centered(vol), new_size)
    return ifft3_centered(f).real


def pad_volume(vol, new_size: int):
    """Zero-pad a real-space map [D, D, D] to [P, P, P] around the centre index."""
    D = vol.shape[-1]
    s = _crop_slices(new_size, D)
    out = jnp.zeros((new_size,) * 3, vol.dtype)
    return out.at[s, s, s].set(vol)
