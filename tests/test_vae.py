"""VAE trainer: the forward model inside the loss, separation of two states, exact resume
after a kill, data-parallel equivalence, sparse Adam, pose refinement, outputs."""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxhet.core import (CTFParams, gaussian_atoms_volume, prepare_volume, random_rotations, render_batch,
                         render_fourier, voxel_fourier_fn, rfft2_centered, axis_angle_to_matrix)
from jaxhet.inference import InMemoryParticles, VAEConfig, train_vae, sparse_adam_update, load_vae
from jaxhet.inference._vae import _Batch, _static, _VAE, encode_batch, real_space_window, vae_loss_terms
from jaxhet.models import CryoDRGNDecoder, VoxelModel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def two_state_volumes(D=16, a=4.0):
    """Two 3-atom 'molecules' differing by the position of one atom."""
    vols = []
    for s in (0, 1):
        pos = np.array([[-6, 0, 0], [6, 0, 0], [0, 5, 0]], np.float32)
        if s:
            pos[2] = [0, -5, 6]
        vols.append(np.asarray(gaussian_atoms_volume(jnp.asarray(pos), jnp.ones(3), jnp.full(3, 3.0), D, a)))
    return vols


def make_two_state(n=512, D=16, a=4.0, snr=1.0, seed=0):
    """Particles of two states (labels), random poses, shifts, CTFs, white noise at SNR."""
    rng = np.random.default_rng(seed)
    vols = two_state_volumes(D, a)
    labels = rng.integers(0, 2, n)
    R = np.asarray(random_rotations(jax.random.key(seed + 1), n))
    shifts = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    ctf = CTFParams.create(rng.uniform(5000, 15000, n).astype(np.float32))
    imgs = np.zeros((n, D, D), np.float32)
    for s in (0, 1):
        m = labels == s
        c = CTFParams(*[np.asarray(x)[m] for x in ctf])
        imgs[m] = np.asarray(render_batch(voxel_fourier_fn(prepare_volume(jnp.asarray(vols[s])), a),
                                          jnp.asarray(R[m]), jnp.asarray(shifts[m]), c, D, a))
    sigma = float(np.sqrt(imgs.var() / snr))
    imgs += sigma * rng.normal(size=imgs.shape).astype(np.float32)
    return InMemoryParticles(imgs, R, -shifts, ctf, a), labels, vols


SMALL = dict(zdim=2, enc_dim=64, dec_dim=64, enc_layers=2, dec_layers=2, lr=1e-3, batch_size=32)


def test_loss_uses_the_core_forward_model(rng):
    """The model image inside the loss equals jaxhet.core.render_fourier on the frequencies K."""
    src, _, vols = make_two_state(n=8, snr=1e6)
    D, a = 16, 4.0
    st = _static(D, a, None, "relion")
    b = src.get_batch(np.arange(8))
    dec = CryoDRGNDecoder(D, a, 2, hidden_dim=16, n_layers=1, output_scale=3.0, rngs=nnx.Rngs(0))
    vae = _VAE(None, dec)
    latents = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    batch = _Batch(jnp.asarray(b.images), jnp.asarray(b.rotations), -jnp.asarray(b.origin_in_pixels), b.ctf,
                   jnp.arange(8), jnp.ones(8))
    t = jax.jit(lambda bb: vae_loss_terms(vae, st, bb, jax.random.key(0), {"latent": latents}, 2.0, train=False))(batch)
    render = jax.jit(lambda z, A, s, c: render_fourier(functools.partial(dec.fourier, z), A, s, c, D, a))
    for i in range(3):
        c = CTFParams(*[x[i] for x in b.ctf])
        img = render(latents[i], batch.rotations[i], batch.shifts[i], c)
        y = rfft2_centered(batch.images[i])
        r = np.abs(np.asarray(y - img).ravel()[st.k_idx]) ** 2
        want = 0.5 * np.sum(st.wts * r) / (D * D * 2.0)
        np.testing.assert_allclose(float(t["nll"][i]), want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(t["kl"]), 0.5 * np.sum(np.asarray(latents) ** 2, -1), rtol=1e-5)


def test_real_space_window_is_cryodrgns():
    """1 inside 0.85 D/2, 0 beyond 0.99 D/2, linear in between (cryoDRGN spherical_window_mask)."""
    D = 32
    w = real_space_window(D)
    c = D // 2
    assert w.shape == (D, D) and w[c, c] == 1.0
    assert w[c, c + 13] == 1.0                      # r = 13/16 = 0.8125 < 0.85
    np.testing.assert_allclose(w[c, c + 14], 1 - (14 / 16 - 0.85) / 0.14, rtol=1e-6)  # r = 0.875
    assert w[0, 0] == 0.0 and w[c, 0] == 0.0        # corner; r = 1.0 > 0.99
    np.testing.assert_allclose(w[c + 9, c + 12], 1 - (15 / 16 - 0.85) / 0.14, rtol=1e-6)  # r = 15/16


def test_windowed_loss_and_encoder_see_the_windowed_image(rng):
    """With a window, the likelihood target is the DFT of (window * image); the encoder's
    input is built from the same windowed image (so noise in the corners reaches neither)."""
    src, _, _ = make_two_state(n=8, snr=1.0)
    D, a = 16, 4.0
    st_w = _static(D, a, "hartley", "relion", (0.85, 0.99))
    st_0 = _static(D, a, "hartley", "relion")
    b = src.get_batch(np.arange(8))
    from jaxhet.models import create_encoder
    rngs = nnx.Rngs(0)
    dec = CryoDRGNDecoder(D, a, 2, hidden_dim=16, n_layers=1, output_scale=3.0, rngs=rngs)
    vae = _VAE(create_encoder("mlp", D, 2, 16, 1, rngs=rngs), dec)
    win = real_space_window(D)
    mk = lambda im: _Batch(jnp.asarray(im), jnp.asarray(b.rotations), -jnp.asarray(b.origin_in_pixels), b.ctf,
                           jnp.arange(8), jnp.ones(8))
    t_w = vae_loss_terms(vae, st_w, mk(b.images), jax.random.key(0), {}, 2.0, train=False)
    t_0 = vae_loss_terms(vae, st_0, mk(b.images * win), jax.random.key(0), {}, 2.0, train=False)
    np.testing.assert_allclose(np.asarray(t_w["nll"]), np.asarray(t_0["nll"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(t_w["mu"]), np.asarray(t_0["mu"]), rtol=1e-4, atol=1e-6)
    t_raw = vae_loss_terms(vae, st_0, mk(b.images), jax.random.key(0), {}, 2.0, train=False)
    assert np.all(np.abs(np.asarray(t_raw["nll"]) - np.asarray(t_w["nll"])) > 1e-3 * np.asarray(t_w["nll"]))
    # the encoder-only path gives the same posterior as the loss terms
    mu, lv = encode_batch(vae, st_w, mk(b.images), {})
    np.testing.assert_allclose(np.asarray(mu), np.asarray(t_w["mu"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lv), np.asarray(t_w["logvar"]), rtol=1e-5, atol=1e-6)


def test_vae_separates_two_states(tmp_path):
    src, labels, _ = make_two_state(n=512, snr=1.0)
    # 10 epochs: with the likelihood at the data's pixel variance (twice cryoDRGN's sigma^2)
    # the latent comes into use around epoch 5-8 here (AUC 0.968 after 8, 0.996 after 10)
    res = train_vae(src, str(tmp_path / "out"), VAEConfig(epochs=10, **SMALL), progress=False)
    z = res.latents
    assert z.shape == (512, 2) and z.dtype == np.float32
    zc = z - z.mean(0)
    pc1 = zc @ np.linalg.svd(zc, full_matrices=False)[2][0]
    from sklearn.metrics import roc_auc_score
    auc = roc_auc_score(labels, pc1)
    assert max(auc, 1 - auc) > 0.97, auc
    # loss went down; outputs on disk in input order
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    out = tmp_path / "out"
    np.testing.assert_array_equal(np.load(out / "latents.npy"), z)
    with open(out / "z.pkl", "rb") as f:
        zp = pickle.load(f)
        lv = pickle.load(f)
    np.testing.assert_array_equal(zp, z)
    assert lv.shape == z.shape
    conf = json.load(open(out / "config.json"))
    assert conf["box_size"] == 16 and conf["pixel_size"] == 4.0 and conf["config"]["zdim"] == 2
    # the likelihood's sigma^2 defaults to the data's per-pixel variance (not cryoDRGN's half)
    np.testing.assert_allclose(conf["noise_variance"], np.mean(np.var(src.images.astype(np.float64), axis=(-2, -1))),
                               rtol=1e-4)
    model, conf2, z2 = load_vae(str(out))
    assert model.box_size == 16 and model.latent_dim == 2
    # the decoder's maps at the two states' mean latents correlate best with their own state
    vols = two_state_volumes()
    m0 = np.asarray(model.volume(jnp.asarray(z[labels == 0].mean(0))))
    m1 = np.asarray(model.volume(jnp.asarray(z[labels == 1].mean(0))))
    cc = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]
    assert cc(m0, vols[0]) - cc(m0, vols[1]) > 0.02 and cc(m1, vols[1]) - cc(m1, vols[0]) > 0.02
    # never overwrite a run silently
    from jaxhet import JaxhetInputError
    with pytest.raises(JaxhetInputError):
        train_vae(src, str(out), VAEConfig(epochs=1, **SMALL), progress=False)


_RUN = textwrap.dedent("""
    import os, sys, signal, numpy as np
    sys.path.insert(0, {here!r})
    from test_vae import make_two_state, SMALL
    from jaxhet.inference import VAEConfig, train_vae
    src, labels, _ = make_two_state(n=32, snr=1.0)
    out, epochs, kill_at, resume, pose = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", sys.argv[5] == "1"
    def on_step(epoch, step):
        if kill_at != "none" and (epoch, step) == tuple(map(int, kill_at.split(","))):
            os.kill(os.getpid(), signal.SIGKILL)
    cfg = VAEConfig(epochs=epochs, pose_refine=pose, pose_refine_start=2, **dict(SMALL, batch_size=16))
    res = train_vae(src, out, cfg, resume=resume, progress=False, on_step=on_step)
    np.save(os.path.join(out, "final_z.npy"), res.latents)
""")


def _run(script, *args, env=None):
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=1200)


def test_resume_after_kill_is_bit_identical(tmp_path):
    script = _RUN.format(here=HERE)
    a, b = tmp_path / "a", tmp_path / "b"
    src, _, _ = make_two_state(n=32, snr=1.0)  # the uninterrupted reference, in this process
    cfg = VAEConfig(epochs=2, pose_refine=True, pose_refine_start=2, **dict(SMALL, batch_size=16))
    np.save(tmp_path / "ref_z.npy", train_vae(src, str(a), cfg, progress=False).latents)
    r = _run(script, b, 2, "2,0", 0, 1)  # SIGKILL in the middle of epoch 2 (after its first step)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (b / "latents.npy").exists()
    res_b = train_vae(src, str(b), cfg, resume=True, progress=False)  # resume (in this process)
    np.save(b / "final_z.npy", res_b.latents)
    ca, cb = np.load(a / "checkpoint.npz"), np.load(b / "checkpoint.npz")
    leaves = [k for k in ca.files if k.startswith("leaf")]
    assert len(leaves) > 10 and leaves == [k for k in cb.files if k.startswith("leaf")]
    for k in leaves:
        np.testing.assert_array_equal(ca[k], cb[k])
    np.testing.assert_array_equal(np.load(tmp_path / "ref_z.npy"), np.load(b / "final_z.npy"))
    # pose corrections were refined (epoch >= 2) and are part of the identical state
    pc = np.load(a / "pose_corrections.npy")
    assert pc.shape == (32, 5) and np.abs(pc).max() > 0


_SHARD = textwrap.dedent("""
    import os, sys, numpy as np, jax
    sys.path.insert(0, {here!r})
    from test_vae import make_two_state, SMALL
    from jaxhet.inference import VAEConfig, train_vae, make_mesh
    src, labels, _ = make_two_state(n=64, snr=1.0)
    assert len(jax.devices()) == 4
    for n_dev in (1, 4):
        mesh = make_mesh(jax.devices()[:n_dev])
        assert mesh.devices.size == n_dev
        out = os.path.join(sys.argv[1], f"d{{n_dev}}")
        res = train_vae(src, out, VAEConfig(epochs=1, **dict(SMALL, batch_size=16)), mesh=mesh, progress=False)
        np.save(os.path.join(out, "z.npy"), res.latents)
""")


def test_data_parallel_matches_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = _SHARD.format(here=HERE)
    r = _run(script, tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    c1, c4 = np.load(tmp_path / "d1" / "checkpoint.npz"), np.load(tmp_path / "d4" / "checkpoint.npz")
    leaves = [k for k in c1.files if k.startswith("leaf")]
    for k in leaves:
        x, y = c1[k].astype(np.float64), c4[k].astype(np.float64)
        assert np.allclose(x, y, rtol=1e-4, atol=2e-5 * (np.abs(x).max() + 1e-12)), k
    z1, z4 = np.load(tmp_path / "d1" / "z.npy"), np.load(tmp_path / "d4" / "z.npy")
    np.testing.assert_allclose(z4, z1, rtol=1e-3, atol=1e-4 * np.abs(z1).max())


def test_sparse_adam_matches_dense_adam_on_touched_rows():
    import optax
    n, d = 6, 3
    rng = np.random.default_rng(0)
    table = table0 = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    m, v, c = jnp.zeros_like(table), jnp.zeros_like(table), jnp.zeros(n, jnp.int32)
    row = table[2]
    tx = optax.adam(0.1)
    os_ = tx.init(row)
    for it in range(4):
        g = jnp.asarray(rng.normal(size=d), jnp.float32)
        idx = jnp.asarray([2, 6])  # row 2 and a padding row (out of range, masked)
        table, m, v, c = sparse_adam_update(table, m, v, c, idx, jnp.stack([g, g]), jnp.asarray([True, False]), 0.1)
        up, os_ = tx.update(g, os_)
        row = optax.apply_updates(row, up)
    np.testing.assert_allclose(np.asarray(table[2]), np.asarray(row), rtol=1e-5, atol=1e-6)
    untouched = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(np.asarray(table)[untouched], np.asarray(table0)[untouched])
    assert int(c[2]) == 4 and int(c.sum()) == 4 and float(np.abs(np.asarray(m)[untouched]).max()) == 0.0


def test_pose_refinement_gradient_recovers_a_perturbed_pose():
    """With the true map as decoder, sparse-Adam steps on the pose table undo a 4 degree error."""
    D, a = 16, 4.0
    vols = two_state_volumes(D, a)
    truth = VoxelModel(D, a, rngs=nnx.Rngs(0))
    truth.map[...] = jnp.asarray(vols[0])
    n = 4
    R = np.asarray(random_rotations(jax.random.key(3), n))
    ctf = CTFParams.create(jnp.full(n, 8000.0))
    imgs = np.asarray(render_batch(voxel_fourier_fn(prepare_volume(jnp.asarray(vols[0])), a), jnp.asarray(R),
                                   jnp.zeros((n, 2)), ctf, D, a))
    err = np.asarray([[0.05, -0.03, 0.02]] * n, np.float32)  # ~ 3.5 degrees
    R_bad = np.einsum("bij,bjk->bik", np.asarray(axis_angle_to_matrix(jnp.asarray(err))), R)
    st = _static(D, a, None, "relion")
    batch = _Batch(jnp.asarray(imgs), jnp.asarray(R_bad), jnp.zeros((n, 2)), ctf, jnp.arange(n), jnp.ones(n))
    vae = _VAE(None, truth)
    tables = {"latent": jnp.zeros((n, 0)), "pose": jnp.zeros((n, 5))}
    pm, pv, pc = jnp.zeros((n, 5)), jnp.zeros((n, 5)), jnp.zeros(n, jnp.int32)

    def loss(pose):
        return jnp.sum(vae_loss_terms(vae, st, batch, jax.random.key(0), dict(tables, pose=pose), 1.0)["nll"])

    g = jax.jit(jax.grad(loss))
    pose = tables["pose"]
    for _ in range(150):
        pose, pm, pv, pc = sparse_adam_update(pose, pm, pv, pc, jnp.arange(n), g(pose), jnp.ones(n, bool), 3e-3)
    R_fix = np.einsum("bij,bjk->bik", np.asarray(axis_angle_to_matrix(pose[:, :3])), R_bad)
    ang = lambda X, Y: np.degrees(np.arccos(np.clip((np.einsum("bij,bij->b", X, Y) - 1) / 2, -1, 1)))
    before, after = ang(R_bad, R).mean(), ang(R_fix, R).mean()
    assert before > 3 and after < 0.5, (before, after)
    assert np.abs(np.asarray(pose[:, 3:])).max() < 0.1  # no spurious shift
