"""The hyper-molecule contract, run over EVERY registered model (jaxhet.models registry).

A new model registered with ``@register_model(name, example=...)`` is picked up here
automatically: shapes, jit, vmap over tau and over k, gradients w.r.t. the nnx
parameters (checked against finite differences), Hermitian symmetry, ``volume`` vs
``fourier`` consistency, ``density`` vs ``volume`` where a density exists, save/load,
and plugging into ``jaxhet.core.render_fourier``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxhet.models as M
from jaxhet.core import fft3_centered, frequency_grid_3d, render_fourier, image_frequencies

NAMES = M.list_models()


def _model(name):
    return M.get_model_spec(name).example(nnx.Rngs(0))


def _inputs(model, rng, n_tau=3, k_shape=(4, 5)):
    nyq = 0.5 / model.pixel_size
    k = rng.uniform(-0.6 * nyq, 0.6 * nyq, (*k_shape, 3)).astype(np.float32)
    taus = rng.normal(size=(n_tau, model.latent_dim)).astype(np.float32)
    return jnp.asarray(taus), jnp.asarray(k)


def test_registry_has_the_first_members():
    assert {"voxel", "mlp", "mlp_geom"} <= set(NAMES)
    for n in NAMES:
        assert M.get_model_spec(n).example is not None, f"{n}: register an example for the contract test"


@pytest.mark.parametrize("name", NAMES)
def test_shapes_attributes_and_hermitian(name, rng):
    m = _model(name)
    assert isinstance(m.box_size, int) and isinstance(m.latent_dim, int) and m.pixel_size > 0
    taus, k = _inputs(m, rng)
    fourier = jax.jit(lambda tau, kk: m.fourier(tau, kk))
    f = fourier(taus[0], k)
    assert f.shape == k.shape[:-1] and f.dtype == jnp.complex64
    assert np.all(np.isfinite(np.asarray(f))) and float(jnp.abs(f).max()) > 0
    # a real map: F(-k) = conj F(k)
    np.testing.assert_allclose(np.asarray(fourier(taus[0], -k)), np.asarray(f).conj(),
                               atol=1e-5 * float(jnp.abs(f).max()))


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_vmap(name, rng):
    m = _model(name)
    taus, k = _inputs(m, rng)
    graphdef, state = nnx.split(m)

    @jax.jit
    def fourier(state, tau, kk):
        return nnx.merge(graphdef, state).fourier(tau, kk)

    closure = jax.jit(lambda t, kk: m.fourier(t, kk))  # the module's own method, parameters as constants
    eager = np.stack([np.asarray(closure(t, k)) for t in taus])
    jitted = np.stack([np.asarray(fourier(state, t, k)) for t in taus])
    assert not np.allclose(jitted[0], jitted[1]) or m.latent_dim == 0  # tau matters
    scale = np.abs(eager).max()
    np.testing.assert_allclose(jitted, eager, atol=2e-5 * scale)
    # vmap over tau (k shared) and over the leading k axis
    vt = jax.vmap(fourier, (None, 0, None))(state, taus, k)
    np.testing.assert_allclose(np.asarray(vt), eager, atol=2e-5 * scale)
    vk = jax.vmap(fourier, (None, None, 0))(state, taus[1], k)
    np.testing.assert_allclose(np.asarray(vk), eager[1], atol=2e-5 * scale)
    # plugs into the forward model as fourier_fn = partial(model.fourier, tau)
    A = jnp.eye(3)
    img = jax.jit(lambda t: render_fourier(functools.partial(m.fourier, t), A, None, None, m.box_size,
                                           m.pixel_size))(taus[0])
    kk = jnp.asarray(image_frequencies(m.box_size, "half")) / (m.box_size * m.pixel_size)
    k3 = jnp.concatenate([kk, jnp.zeros_like(kk[..., :1])], -1)
    np.testing.assert_allclose(np.asarray(img), np.asarray(fourier(state, taus[0], k3)), atol=2e-5 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_grad_matches_finite_differences(name, rng):
    m = _model(name)
    taus, k = _inputs(m, rng)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    target = jnp.asarray(rng.normal(size=k.shape[:-1]) + 1j * rng.normal(size=k.shape[:-1]), jnp.complex64)

    @jax.jit
    def loss(p):
        mm = nnx.merge(graphdef, p, rest)
        return jnp.sum(jnp.abs(mm.fourier(taus[0], k) - target) ** 2)

    g = jax.grad(loss)(params)
    leaves = jax.tree_util.tree_leaves(g)
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert sum(float(jnp.sum(x * x)) for x in leaves) > 0
    # directional derivative vs a central finite difference, in float64
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        rest64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), rest)
        k64, tau64, t64 = jnp.asarray(k, jnp.float64), jnp.asarray(taus[0], jnp.float64), jnp.asarray(target, jnp.complex128)

        @jax.jit
        def loss64(p):
            return jnp.sum(jnp.abs(nnx.merge(graphdef, p, rest64).fourier(tau64, k64) - t64) ** 2)

        g64 = jax.grad(loss64)(p64)
        direction = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)) * (jnp.std(x) + 1e-2), p64)
        analytic = sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree_util.tree_leaves(g64),
                                                              jax.tree_util.tree_leaves(direction)))
        eps = 1e-5
        plus = jax.tree_util.tree_map(lambda p, d: p + eps * d, p64, direction)
        minus = jax.tree_util.tree_map(lambda p, d: p - eps * d, p64, direction)
        numeric = (float(loss64(plus)) - float(loss64(minus))) / (2 * eps)
    assert abs(numeric - analytic) <= 1e-4 * abs(analytic) + 1e-8, (numeric, analytic)
    # the float32 gradient agrees with the float64 one
    g32 = sum(float(jnp.sum(a * b)) for a, b in zip(leaves, jax.tree_util.tree_leaves(direction)))
    assert abs(g32 - analytic) <= 1e-3 * abs(analytic) + 1e-4 * float(loss(params)), (g32, analytic)


@pytest.mark.parametrize("name", NAMES)
def test_volume_is_the_inverse_dft_of_fourier(name, rng):
    m = _model(name)
    tau = jnp.asarray(rng.normal(size=m.latent_dim), jnp.float32)
    vol = np.asarray(jax.jit(m.volume)(tau))
    D = m.box_size
    assert vol.shape == (D, D, D) and vol.dtype == np.float32
    k = jnp.asarray(frequency_grid_3d(D, m.pixel_size))
    want = np.asarray(jax.jit(m.fourier)(tau, k))
    got = np.asarray(fft3_centered(jnp.asarray(vol)))
    r = np.sqrt((frequency_grid_3d(D) ** 2).sum(-1))
    inner = r < D / 2 - 1  # away from the unpaired Nyquist planes
    err = np.linalg.norm((got - want)[inner]) / np.linalg.norm(want[inner])
    assert err < 0.03, err
    # a bigger box at a finer voxel size is the Fourier-padded map: same DFT values
    v2 = np.asarray(jax.jit(lambda t: m.volume(t, box_size=2 * D, pixel_size=m.pixel_size / 2))(tau))
    assert v2.shape == (2 * D,) * 3
    f2 = np.asarray(fft3_centered(jnp.asarray(v2)))[D // 2:D // 2 + D, D // 2:D // 2 + D, D // 2:D // 2 + D]
    err2 = np.linalg.norm((f2 - want)[inner]) / np.linalg.norm(want[inner])
    assert err2 < 0.03, err2


@pytest.mark.parametrize("name", [n for n in NAMES if M.get_model_spec(n).cls.has_density])
def test_density_matches_volume(name, rng):
    m = _model(name)
    tau = jnp.asarray(rng.normal(size=m.latent_dim), jnp.float32)
    D = m.box_size
    r = jnp.asarray(frequency_grid_3d(D)) * m.pixel_size  # voxel-centre positions (x, y, z) in A
    np.testing.assert_allclose(np.asarray(m.density(tau, r)), np.asarray(m.volume(tau)), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_roundtrip(name, rng, tmp_path):
    m = _model(name)
    taus, k = _inputs(m, rng)
    p = str(tmp_path / "model.npz")
    M.save_model(p, m)
    m2 = M.load_model(p)
    assert type(m2) is type(m) and m2.config() == m.config()
    np.testing.assert_array_equal(np.asarray(m2.fourier(taus[0], k)), np.asarray(m.fourier(taus[0], k)))
    with pytest.raises(Exception):
        M.save_model(p, m)  # never overwrite silently
