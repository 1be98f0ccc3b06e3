"""The voxel-grid model: a homogeneous map ``V[z, y, x]`` (mass per voxel) as parameters.

    V(tau, k) = sum_n V[n] exp(-2 pi i k . r_n)     (r_n = (n - D//2) a, k in 1/A)

evaluated off the grid by trilinear interpolation of the zero-padded, gridding-corrected
spectrum (:func:`jaxhet.core.prepare_volume`, RELION's projector), so ``fourier`` is the
exact DFT at grid frequencies up to the interpolation error (< 1 % at pad 2). tau is
ignored (``latent_dim = 0``): it is the building block of homogeneous reconstruction and
the reference against which heterogeneous models are compared.

Reference: Scheres (2012) RELION; survey §7 (voxel representations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxhet.core import gather_trilinear, prepare_volume

from ._base import HyperMolecule, register_model

__all__ = ["VoxelModel"]


def _example(rngs):
    """A smooth blob plus a little noise (8^3, 3 A voxels; pad 4 keeps the gridding bias of a tiny box < 3 %)."""
    m = VoxelModel(box_size=8, pixel_size=3.0, pad_factor=4, rngs=rngs, init_scale=0.001)
    f = np.arange(8) - 4
    r2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    m.map[...] = m.map[...] + jnp.asarray(np.exp(-r2 / 4.0), jnp.float32)
    return m


@register_model("voxel", example=_example)
class VoxelModel(HyperMolecule):
    """A real map on a D^3 grid (homogeneous; ``latent_dim = 0``).

    Args:
        box_size: D.
        pixel_size: voxel size a (A).
        pad_factor: oversampling of the spectrum used for off-grid ``fourier`` values.
        init_scale: std of the random initial map (0 = zeros).
        rngs: nnx random streams (``params``).

    Example:
        >>> m = VoxelModel(32, 4.0, rngs=nnx.Rngs(0))
        >>> m.map[...] = jnp.asarray(known_map)   # or fit it
        >>> img = render_fourier(partial(m.fourier, jnp.zeros(0)), A, None, None, 32, 4.0)
    """

    has_density = True

    def __init__(self, box_size: int, pixel_size: float, latent_dim: int = 0, pad_factor: int = 2,
                 init_scale: float = 0.0, *, rngs: nnx.Rngs):
        if latent_dim != 0:
            raise ValueError("VoxelModel is homogeneous: latent_dim must be 0")
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self.latent_dim = 0
        self.pad_factor = int(pad_factor)
        D = self.box_size
        init = init_scale * jax.random.normal(rngs.params(), (D, D, D), jnp.float32) if init_scale else \
            jnp.zeros((D, D, D), jnp.float32)
        self.map = nnx.Param(init)

    def config(self) -> dict:
        return dict(box_size=self.box_size, pixel_size=self.pixel_size, latent_dim=0, pad_factor=self.pad_factor)

    def fourier(self, tau, k):
        vft = prepare_volume(self.map[...], pad_factor=self.pad_factor)
        scale = vft.padded_size * self.pixel_size
        return gather_trilinear(vft.spectrum, jnp.asarray(k) * scale)

    def density(self, tau, r):
        return gather_trilinear(self.map[...], jnp.asarray(r) / self.pixel_size)

    def volume(self, tau, box_size=None, pixel_size=None):
        same = (box_size is None or int(box_size) == self.box_size) and \
            (pixel_size is None or np.isclose(float(pixel_size), self.pixel_size))
        if same:
            return self.map[...]
        return super().volume(tau, box_size, pixel_size)
