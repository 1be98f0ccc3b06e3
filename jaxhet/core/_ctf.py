"""Contrast transfer function (RELION convention, with cryoDRGN's sign as an option).

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))          [A, V in volts]
    defocus(angle) = (dU + dV)/2 + (dU - dV)/2 cos(2 (angle - angle_ast))   [A, + = underfocus]
    CTF(k) = sin(pi lambda defocus k^2 - pi/2 Cs lambda^3 k^4 + asin(w) + phase_shift)
             * exp(-B k^2 / 4)

with k the spatial frequency in 1/A and Cs in A (mm * 1e7). CTF(0) = +w, which keeps a
map positive for RELION-extracted (inverted-contrast) particles. cryoDRGN's CTF is the
negative of this (``sign="cryodrgn"``).

Reference: RELION ``CTF::getCTF`` (Scheres 2012; Zivanov et al. 2018).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["CTFParams", "ctf", "electron_wavelength_in_angstroms"]


class CTFParams(NamedTuple):
    """Per-image CTF parameters; every field is an array of the same batch shape."""

    defocus_u_in_angstroms: Float[Array, "*batch"]
    defocus_v_in_angstroms: Float[Array, "*batch"]
    defocus_angle_in_degrees: Float[Array, "*batch"]
    voltage_in_kilovolts: Float[Array, "*batch"]
    spherical_aberration_in_mm: Float[Array, "*batch"]
    amplitude_contrast: Float[Array, "*batch"]
    phase_shift_in_degrees: Float[Array, "*batch"]
    b_factor_in_angstroms2: Float[Array, "*batch"]

    @classmethod
    def create(cls, defocus_u_in_angstroms, defocus_v_in_angstroms=None, defocus_angle_in_degrees=0.0,
               voltage_in_kilovolts=300.0, spherical_aberration_in_mm=2.7, amplitude_contrast=0.1,
               phase_shift_in_degrees=0.0, b_factor_in_angstroms2=0.0) -> "CTFParams":
        """Broadcast scalars/arrays to one batch shape (defocus_v defaults to defocus_u)."""
        if defocus_v_in_angstroms is None:
            defocus_v_in_angstroms = defocus_u_in_angstroms
        fields = [defocus_u_in_angstroms, defocus_v_in_angstroms, defocus_angle_in_degrees,
                  voltage_in_kilovolts, spherical_aberration_in_mm, amplitude_contrast,
                  phase_shift_in_degrees, b_factor_in_angstroms2]
        arrs = jnp.broadcast_arrays(*[jnp.asarray(f, jnp.float32) for f in fields])
        return cls(*arrs)


def electron_wavelength_in_angstroms(voltage_in_kilovolts):
    """Relativistic electron wavelength in A for an accelerating voltage in kV."""
    v = jnp.asarray(voltage_in_kilovolts) * 1e3
    return 12.2643247 / jnp.sqrt(v * (1 + 0.978466e-6 * v))


def ctf(params: CTFParams, freqs_in_inverse_angstroms: Float[Array, "... 2"], sign: str = "relion") -> Float[Array, "..."]:
    """CTF of ONE image at 2D spatial frequencies (kx, ky) in 1/A.

    Args:
        params: scalar CTFParams (vmap over images for a batch).
        freqs_in_inverse_angstroms: [..., 2] (kx, ky).
        sign: ``"relion"`` (CTF(0) = +w) or ``"cryodrgn"`` (the negative).

    Returns:
        real CTF values, shape [...].

    Example:
        >>> p = CTFParams.create(15000.0)
        >>> k = frequency_grid_2d(64, pixel_size=2.0)  # doctest: +SKIP
        >>> c = ctf(p, k)
    """
    k = jnp.asarray(freqs_in_inverse_angstroms)
    kx, ky = k[..., 0], k[..., 1]
    k2 = kx * kx + ky * ky
    lam = electron_wavelength_in_angstroms(params.voltage_in_kilovolts)
    du, dv = params.defocus_u_in_angstroms, params.defocus_v_in_angstroms
    ast = jnp.deg2rad(params.defocus_angle_in_degrees)
    # cos(2 (azimuth - ast)) * k^2 = (kx^2 - ky^2) cos(2 ast) + 2 kx ky sin(2 ast): no arctan2
    # per frequency, and smooth (differentiable) at k = 0
    astig_k2 = (kx * kx - ky * ky) * jnp.cos(2 * ast) + 2 * kx * ky * jnp.sin(2 * ast)
    defocus_k2 = 0.5 * (du + dv) * k2 + 0.5 * (du - dv) * astig_k2
    cs = params.spherical_aberration_in_mm * 1e7
    w = params.amplitude_contrast
    gamma = (jnp.pi * lam * defocus_k2 - 0.5 * jnp.pi * cs * lam ** 3 * k2 * k2
             + jnp.arcsin(w) + jnp.deg2rad(params.phase_shift_in_degrees))
    out = jnp.sin(gamma) * jnp.exp(-params.b_factor_in_angstroms2 * k2 / 4.0)
    if sign == "relion":
        return out
    if sign == "cryodrgn":
        return -out
    raise ValueError(f"sign must be 'relion' or 'cryodrgn', got {sign!r}")
