"""The image-formation model (survey eq. 1): ``I = C T P R V + noise``.

``R``: orientation A (the image frequency k samples the map at ``A^T (kx, ky, 0)``);
``P``: projection = central slice; ``T``: in-plane translation (phase factor);
``C``: CTF, multiplied in Fourier space. Everything is computed in the image's *half*
Fourier layout [D, D//2+1] and returned there (the likelihood lives there too);
:func:`render_image` goes back to real space.

Any volume model plugs in as a ``fourier_fn(k)`` giving the map's DFT values at 3D
frequencies k in 1/A (jaxhet's mass-per-voxel normalisation: values do not depend on a
pixel size). :func:`voxel_fourier_fn` makes one from a prepared voxel map.

Reference: survey eq. (1); Scheres (2012) RELION; Zhong et al. (2021) cryoDRGN.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float

from ._ctf import CTFParams, ctf
from ._fourier import irfft2_centered
from ._shifts import shift_phase
from ._slicing import VolumeFT, gather_trilinear, image_frequencies, rotate_image_frequencies

__all__ = ["FourierFn", "voxel_fourier_fn", "render_fourier", "render_image", "project_volume",
           "render_batch"]

FourierFn = Callable[[Float[Array, "... 3"]], Complex[Array, "..."]]


def voxel_fourier_fn(volume_ft: VolumeFT, pixel_size: float) -> FourierFn:
    """The DFT of a voxel map (prepared by ``prepare_volume``) as a function of k in 1/A."""
    scale = volume_ft.padded_size * pixel_size

    def fn(k_in_inverse_angstroms):
        return gather_trilinear(volume_ft.spectrum, k_in_inverse_angstroms * scale)

    return fn


def render_fourier(fourier_fn: FourierFn, rotation: Float[Array, "3 3"], shift_in_pixels: Float[Array, "2"] | None,
                   ctf_params: CTFParams | None, box_size: int, pixel_size: float,
                   ctf_sign: str = "relion", layout: str = "half") -> Complex[Array, "d dh"]:
    """DFT of one model image: ``C(k) T_s(k) V(A^T k)``.

    Args:
        fourier_fn: map DFT at 3D frequencies in 1/A (any volume model).
        rotation: [3, 3] RELION matrix A.
        shift_in_pixels: translation of the particle (= minus the RELION origin), or None.
        ctf_params: scalar :class:`CTFParams`, or None for no CTF.
        box_size, pixel_size: of the image.
        ctf_sign: ``"relion"`` or ``"cryodrgn"``.
        layout: ``"half"`` or ``"full"``.
    """
    k_np = image_frequencies(box_size, layout)  # static grid (cycles/box), separable in (ky, kx)
    k_phys = jnp.asarray(k_np / (box_size * pixel_size))
    out = fourier_fn(rotate_image_frequencies(k_phys, rotation))
    if ctf_params is not None:
        out = out * ctf(ctf_params, k_phys, ctf_sign)
    if shift_in_pixels is not None:
        # exp(-2 pi i (kx sx + ky sy) / D) as an outer product of two 1D phase vectors
        s = jnp.asarray(shift_in_pixels)
        phase_x = shift_phase(jnp.asarray(k_np[0, :, :]) * jnp.asarray([1.0, 0.0], k_np.dtype), s, box_size)
        phase_y = shift_phase(jnp.asarray(k_np[:, 0, :]) * jnp.asarray([0.0, 1.0], k_np.dtype), s, box_size)
        out = out * (phase_y[:, None] * phase_x[None, :])
    return out


def project_volume(volume_ft: VolumeFT, rotation, shift_in_pixels=None, ctf_params=None, pixel_size: float = 1.0,
                   box_size: int | None = None, ctf_sign: str = "relion") -> Complex[Array, "d dh"]:
    """:func:`render_fourier` for a prepared voxel map (image box defaults to the map's)."""
    D = volume_ft.box_size if box_size is None else box_size
    # the image may be Fourier-cropped: its pixel is larger by (map box / image box)
    img_pixel = pixel_size * volume_ft.box_size / D
    return render_fourier(voxel_fourier_fn(volume_ft, pixel_size), rotation, shift_in_pixels, ctf_params,
                          D, img_pixel, ctf_sign)


def render_image(image_ft: Complex[Array, "d dh"], box_size: int) -> Float[Array, "d d"]:
    """Half-layout image DFT -> real image (``irfft2_centered``)."""
    return irfft2_centered(image_ft, box_size)


def render_batch(fourier_fn: FourierFn, rotations: Float[Array, "b 3 3"], shifts_in_pixels: Float[Array, "b 2"],
                 ctf_params: CTFParams, box_size: int, pixel_size: float, ctf_sign: str = "relion",
                 real_space: bool = True) -> Array:
    """Batched :func:`render_fourier` (vmap over images), optionally to real space."""
    f = jax.vmap(lambda R, s, c: render_fourier(fourier_fn, R, s, c, box_size, pixel_size, ctf_sign))(
        rotations, shifts_in_pixels, ctf_params)
    return irfft2_centered(f, box_size) if real_space else f
