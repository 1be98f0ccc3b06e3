"""Encoders q(tau | image) = N(mu, diag exp(logvar)) and the autodecoder table.

Inputs are prepared by :func:`encoder_input` from an image's half-layout DFT that has
already been *centred* (its shift undone) and *phase-flipped* by sign(CTF), as cryoDRGN
does, and divided by the data scale:

- ``"hartley"`` (cryoDRGN's default): the Hartley values ``H = Re F - Im F`` at every
  frequency inside the circle of radius D/2 (DC excluded), over the full plane, obtained
  from the half plane as ``H(k) = Re - Im``, ``H(-k) = Re + Im``; fed to
  :class:`MLPEncoder` (cryoDRGN's ``ResidLinearMLP`` encoder, ``--enc-mask D/2``);
- ``"real"``: the centred, phase-flipped real-space image, for :class:`CNNEncoder`
  (``D x D``), or flattened inside a circular mask of radius D/2 for an MLP.

:class:`AutoDecoderTable` is the encoder-free variant (a free latent per image,
Bojanowski et al. 2018 / survey §7.2): its rows are optimised directly.

Reference: Zhong et al. (2021) cryoDRGN (``HetOnlyVAE.encode``; ``ConvEncoder``);
Kingma & Welling (2014) VAE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxhet.core import half_frequency_grid_2d, irfft2_centered, circular_mask

from ._mlp import ResidLinearMLP

__all__ = ["hartley_mask_indices", "encoder_input", "encoder_input_dim", "MLPEncoder", "CNNEncoder",
           "AutoDecoderTable", "create_encoder"]


def hartley_mask_indices(box_size: int, radius: float | None = None) -> np.ndarray:
    """Flat half-layout indices of the frequencies with 0 < |k| <= radius (default D/2)."""
    r = box_size / 2 if radius is None else radius
    k = half_frequency_grid_2d(box_size)
    k2 = (k ** 2).sum(-1).ravel()
    return np.nonzero((k2 <= r * r) & (k2 > 0))[0].astype(np.int32)


def encoder_input_dim(kind: str, box_size: int) -> int:
    if kind == "hartley":
        return 2 * len(hartley_mask_indices(box_size))
    if kind == "real":
        return int(circular_mask(box_size).sum())
    if kind == "image":
        return box_size * box_size
    raise ValueError(f"encoder input must be 'hartley', 'real' or 'image', got {kind!r}")


def encoder_input(centred_ft, kind: str, box_size: int):
    """Encoder features from centred, phase-flipped, normalised half-layout DFTs.

    Args:
        centred_ft: [..., D, D//2+1] complex.
        kind: ``"hartley"`` -> [..., 2 n_mask] Hartley values in the circle;
            ``"real"`` -> [..., n_disc] real-space pixels inside the disc of radius D/2;
            ``"image"`` -> [..., D, D] real-space image (for the CNN).
    """
    D = box_size
    if kind == "hartley":
        idx = jnp.asarray(hartley_mask_indices(D))
        f = centred_ft.reshape(*centred_ft.shape[:-2], -1)[..., idx]
        return jnp.concatenate([f.real - f.imag, f.real + f.imag], -1)
    img = irfft2_centered(centred_ft, D) / D  # unit-variance pixels for unit-variance DFT values
    if kind == "image":
        return img
    if kind == "real":
        m = np.nonzero(circular_mask(D).ravel())[0]
        return img.reshape(*img.shape[:-2], -1)[..., m]
    raise ValueError(f"encoder input must be 'hartley', 'real' or 'image', got {kind!r}")


class MLPEncoder(nnx.Module):
    """cryoDRGN's residual MLP encoder: features [n_in] -> (mu, logvar) [latent_dim] each.

    Args:
        in_dim: feature length (:func:`encoder_input_dim`).
        latent_dim: zdim.
        hidden_dim, n_layers: ``--enc-dim``, ``--enc-layers``.
    """

    kind = "amortized"

    def __init__(self, in_dim: int, latent_dim: int, hidden_dim: int = 256, n_layers: int = 3,
                 activation: str = "relu", *, rngs: nnx.Rngs):
        self.latent_dim = int(latent_dim)
        self.mlp = ResidLinearMLP(in_dim, n_layers, hidden_dim, 2 * latent_dim, activation, rngs=rngs)

    def __call__(self, x):
        out = self.mlp(x)
        return out[..., :self.latent_dim], out[..., self.latent_dim:]


class CNNEncoder(nnx.Module):
    """A small convolutional encoder over the real-space image [D, D] (cryoDRGN ConvEncoder-like).

    4x4 convolutions with stride 2 and LeakyReLU(0.2), channels doubling from
    ``channels``, until the feature map is at most 4x4; then a dense layer to
    (mu, logvar). Works for any D >= 8.
    """

    kind = "amortized"

    def __init__(self, box_size: int, latent_dim: int, channels: int = 32, max_channels: int = 256,
                 *, rngs: nnx.Rngs):
        self.latent_dim = int(latent_dim)
        convs, c_in, size, c = [], 1, int(box_size), int(channels)
        while size > 4:
            convs.append(nnx.Conv(c_in, c, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                                  rngs=rngs))
            c_in, size, c = c, (size + 1) // 2, min(2 * c, max_channels)
        self.convs = nnx.List(convs)
        self.out = nnx.Linear(c_in * size * size, 2 * latent_dim, rngs=rngs)

    def __call__(self, img):
        x = img[..., None]
        batch = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        for conv in self.convs:
            x = jax.nn.leaky_relu(conv(x), 0.2)
        out = self.out(x.reshape(x.shape[0], -1)).reshape(*batch, 2 * self.latent_dim)
        return out[..., :self.latent_dim], out[..., self.latent_dim:]


class AutoDecoderTable(nnx.Module):
    """A free latent per image (autodecoder): ``rows[i]`` is image i's tau.

    Not an amortised encoder: the trainer optimises the rows it touches with a sparse
    (row-wise) Adam and puts a standard-normal prior on them. Returns (mu, None).
    """

    kind = "autodecoder"

    def __init__(self, n_images: int, latent_dim: int, init_scale: float = 0.1, *, rngs: nnx.Rngs):
        self.latent_dim = int(latent_dim)
        self.n_images = int(n_images)
        self.rows = nnx.Variable(init_scale * jax.random.normal(rngs.params(), (n_images, latent_dim), jnp.float32))

    def __call__(self, indices):
        return self.rows[...][indices], None


def create_encoder(kind: str, box_size: int, latent_dim: int, hidden_dim: int = 256, n_layers: int = 3,
                   n_images: int | None = None, *, rngs: nnx.Rngs):
    """``"mlp"`` (Hartley input, cryoDRGN default), ``"mlp_real"``, ``"cnn"`` or ``"autodecoder"``."""
    if kind == "mlp":
        return MLPEncoder(encoder_input_dim("hartley", box_size), latent_dim, hidden_dim, n_layers, rngs=rngs)
    if kind == "mlp_real":
        return MLPEncoder(encoder_input_dim("real", box_size), latent_dim, hidden_dim, n_layers, rngs=rngs)
    if kind == "cnn":
        return CNNEncoder(box_size, latent_dim, rngs=rngs)
    if kind == "autodecoder":
        if n_images is None:
            raise ValueError("autodecoder needs n_images")
        return AutoDecoderTable(n_images, latent_dim, rngs=rngs)
    raise ValueError(f"encoder must be 'mlp', 'mlp_real', 'cnn' or 'autodecoder', got {kind!r}")


ENCODER_INPUT = {"mlp": "hartley", "mlp_real": "real", "cnn": "image", "autodecoder": None}
