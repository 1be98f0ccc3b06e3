"""The linear hyper-molecule (survey §5, eq. 5-6; Remark 7.2): a mean map and K principal
volumes,

    V(tau) = X_0 + sum_k tau_k X_k,       V^(tau, k) = X_0^(k) + sum_k tau_k X_k^(k),

with tau = b the per-image coefficients (PPCA: b ~ N(0, I_K)). Fitted by
:func:`jaxhet.inference.fit_ppca` or :func:`jaxhet.inference.estimate_covariance`; as any
registered model it is saved with :func:`save_model` and evaluated by ``jaxhet eval-vol``.

``fourier`` forms the real map at tau (linear, cheap: K multiply-adds per voxel) and
samples its zero-padded, gridding-corrected spectrum by trilinear interpolation, exactly as
:class:`jaxhet.models.VoxelModel` (RELION's projector).

References: Tagare et al. (2015) J. Struct. Biol. 191:245; Punjani & Fleet (2021) J.
Struct. Biol. 213:107702 (3D variability analysis); Katsevich et al. (2015).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxhet.core import gather_trilinear, prepare_volume

from ._base import HyperMolecule, register_model

__all__ = ["LinearModel"]


def _example(rngs):
    """A blob with two localised components (8^3, 3 A voxels, pad 4 for a tiny box)."""
    m = LinearModel(box_size=8, pixel_size=3.0, latent_dim=2, pad_factor=4, rngs=rngs, init_scale=0.001)
    f = np.arange(8) - 4
    z, y, x = np.meshgrid(f, f, f, indexing="ij")
    blob = np.exp(-(x ** 2 + y ** 2 + z ** 2) / 4.0)
    c1 = np.exp(-((x - 1) ** 2 + y ** 2 + z ** 2) / 2.0) - np.exp(-((x + 1) ** 2 + y ** 2 + z ** 2) / 2.0)
    c2 = np.exp(-(x ** 2 + (y - 1) ** 2 + z ** 2) / 2.0) * 0.5
    m.mean[...] = m.mean[...] + jnp.asarray(blob, jnp.float32)
    m.components[...] = m.components[...] + jnp.asarray(np.stack([c1, c2]), jnp.float32)
    return m


@register_model("linear", example=_example)
class LinearModel(HyperMolecule):
    """Mean map plus K principal volumes on a D^3 grid; tau = the K coefficients.

    Args:
        box_size: D.
        pixel_size: voxel size a (A).
        latent_dim: K (number of components).
        pad_factor: oversampling of the spectrum for off-grid ``fourier`` values.
        init_scale: std of random initial maps (0 = zeros).
        rngs: nnx random streams.

    Example:
        >>> m = LinearModel(32, 4.0, latent_dim=4, rngs=nnx.Rngs(0))
        >>> m.mean[...] = jnp.asarray(x0); m.components[...] = jnp.asarray(xk)  # [K, D, D, D]
        >>> vol = m.volume(jnp.array([1.0, 0, 0, 0]))   # X_0 + X_1
    """

    has_density = True

    def __init__(self, box_size: int, pixel_size: float, latent_dim: int, pad_factor: int = 2,
                 init_scale: float = 0.0, *, rngs: nnx.Rngs):
        if latent_dim < 1:
            raise ValueError("LinearModel needs latent_dim >= 1")
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self.latent_dim = int(latent_dim)
        self.pad_factor = int(pad_factor)
        D, K = self.box_size, self.latent_dim
        if init_scale:
            k1, k2 = jax.random.split(rngs.params())
            m0 = init_scale * jax.random.normal(k1, (D, D, D), jnp.float32)
            mk = init_scale * jax.random.normal(k2, (K, D, D, D), jnp.float32)
        else:
            m0 = jnp.zeros((D, D, D), jnp.float32)
            mk = jnp.zeros((K, D, D, D), jnp.float32)
        self.mean = nnx.Param(m0)
        self.components = nnx.Param(mk)

    @classmethod
    def from_volumes(cls, volumes, pixel_size: float, pad_factor: int = 2) -> "LinearModel":
        """Build from [K+1, D, D, D] volumes (X_0 first), e.g. ``PPCAResult.volumes``."""
        v = np.asarray(volumes, np.float32)
        m = cls(v.shape[-1], pixel_size, v.shape[0] - 1, pad_factor, rngs=nnx.Rngs(0))
        m.mean[...] = jnp.asarray(v[0])
        m.components[...] = jnp.asarray(v[1:])
        return m

    def config(self) -> dict:
        return dict(box_size=self.box_size, pixel_size=self.pixel_size, latent_dim=self.latent_dim,
                    pad_factor=self.pad_factor)

    def _map(self, tau):
        tau = jnp.asarray(tau, jnp.float32).reshape(self.latent_dim)
        return self.mean[...] + jnp.tensordot(tau, self.components[...], 1)

    def fourier(self, tau, k):
        vft = prepare_volume(self._map(tau), pad_factor=self.pad_factor)
        scale = vft.padded_size * self.pixel_size
        return gather_trilinear(vft.spectrum, jnp.asarray(k) * scale)

    def density(self, tau, r):
        return gather_trilinear(self._map(tau), jnp.asarray(r) / self.pixel_size)

    def volume(self, tau, box_size=None, pixel_size=None):
        same = (box_size is None or int(box_size) == self.box_size) and \
            (pixel_size is None or np.isclose(float(pixel_size), self.pixel_size))
        if same:
            return self._map(tau)
        return super().volume(tau, box_size, pixel_size)
