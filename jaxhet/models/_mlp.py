"""The cryoDRGN decoder: an MLP over positional-encoded 3D frequencies and tau.

cryoDRGN (Zhong et al. 2021, Nat. Methods; ``FTPositionalDecoder`` of cryoDRGN 4.x)
represents the map's Fourier transform at conformation tau as

    (a, b) = MLP([gamma(c), tau]),    F(c) = s (a + i b)      for c in the half space,
    F(-c) = conj F(c),                 F(c) = 0 outside the Nyquist sphere |c| > 1/2,

with c = k * pixel_size the frequency in cycles per pixel (cryoDRGN's lattice coordinate
in [-1/2, 1/2]) and s a fixed output scale (cryoDRGN normalises its data by the std of
the Hartley values; jaxhet sets s the same way, so the network outputs O(1) numbers).
cryoDRGN reads the prediction as the *Hartley* value ``H(c) = a - b`` (= Re F - Im F),
which is the same function: the Gaussian likelihood of Fourier values over a half plane
equals the squared error of Hartley values over the whole plane (Parseval), so fitting
either is the same problem. The half-space rule (flip c -> -c and conjugate when
c_z > 0; ties on the plane c_z = 0 broken by c_y then c_x) makes F exactly Hermitian, so
maps are real.

Positional encodings gamma (3 * pe_dim frequencies, sin and cos each; pe_dim defaults
to D // 2 as in cryoDRGN):

- ``"geom_lowf"``: per axis, ``sin(c_x f_j), cos(c_x f_j)`` with geometric
  ``f_j = (D/2) (2/D)^(j / (pe_dim - 1))`` (wavelengths 2 pi * 2/D .. 2 pi);
- ``"gaussian"`` (cryoDRGN's default): random Fourier features
  ``sin(w_j . c * D/2), cos(...)`` with ``w_j ~ N(0, feat_sigma^2 I_3)``, 3 * pe_dim of
  them, fixed (saved, not trained) (Tancik et al. 2020).

The MLP is cryoDRGN's ``ResidLinearMLP``: Linear(in, h), ReLU, then ``n_layers`` times
[x + Linear(h, h)(x), ReLU], then Linear(h, 2); PyTorch's default initialisation
(uniform +-1/sqrt(fan_in)). The first layer's weight is split into its positional-encoding
and tau blocks so that ``W_tau tau`` is computed once per call rather than once per
frequency (the same function as concatenating tau to every encoded coordinate).

Reference: Zhong, Bepler, Berger & Davis (2021) cryoDRGN, Nat. Methods 18:176;
survey §7.2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._base import HyperMolecule, register_model

__all__ = ["TorchLinear", "ResidLinearMLP", "CryoDRGNDecoder", "positional_encoding"]


def _torch_uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchLinear(nnx.Linear):
    """``nnx.Linear`` with PyTorch's default init (weight and bias U(+-1/sqrt(fan_in)))."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        init = _torch_uniform(in_features)
        super().__init__(in_features, out_features, kernel_init=init, bias_init=init, rngs=rngs)


_ACTIVATIONS = {"relu": jax.nn.relu, "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01)}


class ResidLinearMLP(nnx.Module):
    """cryoDRGN's ``ResidLinearMLP(in_dim, nlayers, hidden_dim, out_dim, activation)``.

    ``Linear(in, h)`` (residual when in == h), act, ``n_layers`` x [residual
    ``Linear(h, h)``, act], ``Linear(h, out)`` (residual when h == out).
    """

    def __init__(self, in_dim: int, n_layers: int, hidden_dim: int, out_dim: int,
                 activation: str = "relu", *, rngs: nnx.Rngs):
        self.in_dim, self.hidden_dim, self.out_dim = int(in_dim), int(hidden_dim), int(out_dim)
        self.activation = activation
        self.first = TorchLinear(in_dim, hidden_dim, rngs=rngs)
        self.hidden = nnx.List([TorchLinear(hidden_dim, hidden_dim, rngs=rngs) for _ in range(n_layers)])
        self.last = TorchLinear(hidden_dim, out_dim, rngs=rngs)

    def tail(self, h):
        """Everything after the first layer's affine map (input: its pre-activation)."""
        act = _ACTIVATIONS[self.activation]
        h = act(h)
        for lin in self.hidden:
            h = act(lin(h) + h)
        out = self.last(h)
        return out + h if self.hidden_dim == self.out_dim else out

    def __call__(self, x):
        h = self.first(x)
        if self.in_dim == self.hidden_dim:
            h = h + x
        return self.tail(h)


def positional_encoding(c, pe_type: str, pe_dim: int, box_size: int, rand_freqs=None):
    """cryoDRGN's positional encoding of frequencies c (cycles/pixel), [..., 3] -> [..., 6 pe_dim].

    Args:
        c: [..., 3] coordinates in [-1/2, 1/2].
        pe_type: ``"geom_lowf"`` or ``"gaussian"``.
        pe_dim: frequencies per axis (``D // 2`` by default in cryoDRGN).
        box_size: D (sets the highest frequency D/2).
        rand_freqs: [3 pe_dim, 3] Gaussian directions (``"gaussian"`` only).
    """
    D2 = box_size // 2
    if pe_type == "gaussian":
        k = jnp.einsum("...i,ji->...j", c, rand_freqs * D2)  # [..., 3 pe_dim]
        return jnp.concatenate([jnp.sin(k), jnp.cos(k)], -1)
    if pe_type == "geom_lowf":
        j = np.arange(pe_dim, dtype=np.float64)
        f = (D2 * (1.0 / D2) ** (j / max(pe_dim - 1, 1))).astype(np.float32)
        k = c[..., :, None] * f  # [..., 3, pe_dim]
        x = jnp.concatenate([jnp.sin(k), jnp.cos(k)], -1)  # [..., 3, 2 pe_dim] (cryoDRGN order)
        return x.reshape(*c.shape[:-1], 6 * pe_dim)
    raise ValueError(f"pe_type must be 'geom_lowf' or 'gaussian', got {pe_type!r}")


def _example(rngs):
    return CryoDRGNDecoder(box_size=8, pixel_size=3.0, latent_dim=2, hidden_dim=16, n_layers=2,
                           pe_type="gaussian", rngs=rngs)


def _example_geom(rngs):
    return CryoDRGNDecoder(box_size=8, pixel_size=3.0, latent_dim=2, hidden_dim=16, n_layers=1,
                           pe_type="geom_lowf", rngs=rngs)


@register_model("mlp", example=_example)
class CryoDRGNDecoder(HyperMolecule):
    """cryoDRGN's Fourier-domain positional decoder as a hyper-molecule.

    Args:
        box_size, pixel_size: the grid the model is trained on (sets Nyquist and the
            encoding frequencies).
        latent_dim: zdim.
        hidden_dim, n_layers: MLP width and number of residual hidden layers
            (cryoDRGN ``--dec-dim``, ``--dec-layers``).
        pe_type: ``"gaussian"`` (cryoDRGN's default) or ``"geom_lowf"``.
        pe_dim: frequencies per axis (default D // 2).
        feat_sigma: std of the Gaussian feature directions (cryoDRGN default 0.5).
        activation: ``"relu"`` or ``"leaky_relu"``.
        output_scale: s, the DFT value of a unit network output (the trainer sets it
            to the RMS of the data's Fourier values, as cryoDRGN's data normalisation).
    """

    def __init__(self, box_size: int, pixel_size: float, latent_dim: int, hidden_dim: int = 256,
                 n_layers: int = 3, pe_type: str = "gaussian", pe_dim: int | None = None,
                 feat_sigma: float = 0.5, activation: str = "relu", output_scale: float = 1.0,
                 *, rngs: nnx.Rngs):
        if pe_type not in ("gaussian", "geom_lowf"):
            raise ValueError(f"pe_type must be 'gaussian' or 'geom_lowf', got {pe_type!r}")
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self.latent_dim = int(latent_dim)
        self.hidden_dim, self.n_layers = int(hidden_dim), int(n_layers)
        self.pe_type = pe_type
        self.pe_dim = int(self.box_size // 2 if pe_dim is None else pe_dim)
        self.feat_sigma = float(feat_sigma)
        self.activation = activation
        n_pe = 6 * self.pe_dim
        self.mlp = ResidLinearMLP(n_pe + self.latent_dim, self.n_layers, self.hidden_dim, 2, activation, rngs=rngs)
        if pe_type == "gaussian":
            rf = jax.random.normal(rngs.params(), (3 * self.pe_dim, 3), jnp.float32) * self.feat_sigma
        else:
            rf = jnp.zeros((0, 3), jnp.float32)
        self.rand_freqs = nnx.Variable(rf)  # saved, not trained (not an nnx.Param)
        self.output_scale = nnx.Variable(jnp.asarray(output_scale, jnp.float32))

    def config(self) -> dict:
        return dict(box_size=self.box_size, pixel_size=self.pixel_size, latent_dim=self.latent_dim,
                    hidden_dim=self.hidden_dim, n_layers=self.n_layers, pe_type=self.pe_type,
                    pe_dim=self.pe_dim, feat_sigma=self.feat_sigma, activation=self.activation,
                    output_scale=float(self.output_scale[...]))

    def network(self, tau, c):
        """Raw MLP output (a, b) [..., 2] at half-space coordinates c (cycles/pixel)."""
        x = positional_encoding(c, self.pe_type, self.pe_dim, self.box_size, self.rand_freqs[...])
        n_pe = x.shape[-1]
        W = self.mlp.first.kernel[...]
        h = x @ W[:n_pe] + self.mlp.first.bias[...]
        if self.latent_dim:
            h = h + jnp.asarray(tau) @ W[n_pe:]
        return self.mlp.tail(h)

    def fourier(self, tau, k):
        c = jnp.asarray(k) * self.pixel_size
        cdtype = jnp.complex128 if c.dtype == jnp.float64 else jnp.complex64
        cx, cy, cz = c[..., 0], c[..., 1], c[..., 2]
        flip = (cz > 0) | ((cz == 0) & ((cy > 0) | ((cy == 0) & (cx > 0))))
        ch = jnp.where(flip[..., None], -c, c)
        out = self.network(tau, ch)
        re = out[..., 0]
        im = jnp.where(flip, -out[..., 1], out[..., 1])
        im = jnp.where((cx == 0) & (cy == 0) & (cz == 0), 0.0, im)  # F(0) is real
        # |c| <= 1/2 with a relative slack of 1e-5: rotated image frequencies ON the Nyquist
        # circle must not fall in or out with the last bit of rounding (the next shell is
        # 4/D^2 relatively further out, > 1e-5 for D < 600)
        inside = jnp.sum(c * c, -1) <= 0.25 * (1 + 1e-5)
        s = self.output_scale[...]
        return jnp.where(inside, s * re + 1j * (s * im), 0.0).astype(cdtype)


# the geometric-encoding variant is the same class; registered under its own name so the
# contract test covers both encodings
@register_model("mlp_geom", example=_example_geom)
class CryoDRGNDecoderGeom(CryoDRGNDecoder):
    """:class:`CryoDRGNDecoder` with ``pe_type="geom_lowf"`` by default."""

    def __init__(self, box_size, pixel_size, latent_dim, hidden_dim=256, n_layers=3, pe_type="geom_lowf",
                 pe_dim=None, feat_sigma=0.5, activation="relu", output_scale=1.0, *, rngs):
        super().__init__(box_size, pixel_size, latent_dim, hidden_dim, n_layers, pe_type, pe_dim, feat_sigma,
                         activation, output_scale, rngs=rngs)
