"""The cryoDRGN decoder reproduces cryoDRGN's own FTPositionalDecoder (same weights ->
same outputs), and the encoders' input/shape conventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxhet.core import rfft2_centered, hartley2
from jaxhet.models import (CryoDRGNDecoder, MLPEncoder, CNNEncoder, AutoDecoderTable, encoder_input,
                           encoder_input_dim, hartley_mask_indices, positional_encoding)


def _copy_torch_mlp(ours, torch_seq):
    """cryoDRGN ResidLinearMLP.main (Linear, act, [ResidLinear, act]*n, Linear) -> ours."""
    lins = [m for m in torch_seq if m.__class__.__name__ in ("MyLinear", "Linear", "ResidLinear")]
    lins = [getattr(m, "linear", m) for m in lins]
    mine = [ours.first, *ours.hidden, ours.last]
    assert len(lins) == len(mine)
    for a, b in zip(mine, lins):
        a.kernel[...] = jnp.asarray(b.weight.detach().numpy().T)
        a.bias[...] = jnp.asarray(b.bias.detach().numpy())


@pytest.mark.parametrize("pe_type", ["gaussian", "geom_lowf"])
def test_matches_cryodrgn_ftpositionaldecoder(pe_type, rng):
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("cryodrgn.models")
    D, zdim, a = 16, 3, 2.5
    torch.manual_seed(0)
    ref = models.FTPositionalDecoder(3 + zdim, D + 1, 2, 32, torch.nn.ReLU, enc_type=pe_type, feat_sigma=0.5)
    ref.eval()
    ours = CryoDRGNDecoder(D, a, zdim, hidden_dim=32, n_layers=2, pe_type=pe_type, rngs=nnx.Rngs(1))
    _copy_torch_mlp(ours.mlp, ref.decoder.main)
    if pe_type == "gaussian":
        ours.rand_freqs[...] = jnp.asarray(ref.rand_freqs.detach().numpy())
    # cryoDRGN coordinates: cycles/pixel in [-1/2, 1/2]; avoid the c_z = 0 plane (its tie rule differs)
    c = rng.uniform(-0.35, 0.35, (200, 3)).astype(np.float32)
    c[:, 2] = np.where(np.abs(c[:, 2]) < 1e-3, 0.01, c[:, 2])
    c = c[np.linalg.norm(c, axis=1) <= 0.5]  # inside the Nyquist sphere (jaxhet is 0 outside)
    z = rng.normal(size=zdim).astype(np.float32)
    with torch.no_grad():
        x = torch.cat([torch.from_numpy(c), torch.from_numpy(np.tile(z, (len(c), 1)))], -1)
        want = ref.decode(x).numpy()  # (a, b) with H = a - b
    f = np.asarray(jax.jit(ours.fourier)(jnp.asarray(z), jnp.asarray(c / a)))
    np.testing.assert_allclose(f.real, want[:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f.imag, want[:, 1], rtol=1e-4, atol=1e-5)
    # the Hartley value cryoDRGN compares with its data
    np.testing.assert_allclose(f.real - f.imag, want[:, 0] - want[:, 1], rtol=1e-4, atol=1e-5)


def test_positional_encodings_by_hand():
    c = jnp.asarray([[0.1, -0.2, 0.3]])
    D = 8
    g = np.asarray(positional_encoding(c, "geom_lowf", 4, D))
    f = 4 * (1 / 4) ** (np.arange(4) / 3)  # D/2 .. 1, geometric
    want = np.concatenate([np.concatenate([np.sin(x * f), np.cos(x * f)]) for x in (0.1, -0.2, 0.3)])
    np.testing.assert_allclose(g[0], want, rtol=1e-5, atol=1e-6)
    w = np.arange(36, dtype=np.float32).reshape(12, 3) / 50
    gg = np.asarray(positional_encoding(c, "gaussian", 4, D, jnp.asarray(w)))
    arg = (w * 4) @ np.array([0.1, -0.2, 0.3])
    np.testing.assert_allclose(gg[0], np.concatenate([np.sin(arg), np.cos(arg)]), rtol=1e-5, atol=1e-6)


def test_decoder_is_zero_outside_nyquist_and_scales_with_output_scale():
    m = CryoDRGNDecoder(8, 2.0, 2, hidden_dim=16, n_layers=1, rngs=nnx.Rngs(0))
    tau = jnp.ones(2)
    k_out = jnp.asarray([[0.26, 0.0, 0.05], [0.0, 0.0, 0.251]])  # |k| a > 1/2
    assert float(jnp.abs(m.fourier(tau, k_out)).max()) == 0.0
    k_in = jnp.asarray([[0.1, 0.05, -0.02]])
    f1 = m.fourier(tau, k_in)
    m.output_scale[...] = jnp.asarray(7.0)
    np.testing.assert_allclose(np.asarray(m.fourier(tau, k_in)), 7 * np.asarray(f1), rtol=1e-6)
    assert m.config()["output_scale"] == 7.0


def test_hartley_encoder_input_is_the_masked_hartley_transform(rng):
    D = 16
    img = rng.normal(size=(D, D)).astype(np.float32)
    feats = np.asarray(encoder_input(rfft2_centered(jnp.asarray(img)), "hartley", D))
    assert feats.shape == (encoder_input_dim("hartley", D),)
    # every value is a Hartley value of the centred 2D DFT at a frequency inside the circle
    H = np.asarray(hartley2(jnp.asarray(img)))
    f = np.arange(D) - D // 2
    r2 = f[:, None] ** 2 + f[None, :] ** 2
    inside = H[(r2 <= (D / 2) ** 2) & (r2 > 0)]
    assert np.allclose(np.sort(np.unique(np.round(feats, 3))), np.sort(np.unique(np.round(inside, 3))))


def test_encoder_shapes():
    D, z = 16, 3
    x = jnp.zeros((5, encoder_input_dim("hartley", D)))
    mu, lv = MLPEncoder(x.shape[-1], z, 32, 2, rngs=nnx.Rngs(0))(x)
    assert mu.shape == (5, z) and lv.shape == (5, z)
    mu, lv = CNNEncoder(D, z, channels=8, rngs=nnx.Rngs(0))(jnp.zeros((5, D, D)))
    assert mu.shape == (5, z) and lv.shape == (5, z)
    t = AutoDecoderTable(10, z, rngs=nnx.Rngs(0))
    mu, lv = t(jnp.asarray([3, 7]))
    assert lv is None and np.allclose(np.asarray(mu), np.asarray(t.rows[...])[[3, 7]])
