"""Multi-body refinement (jaxhet.inference._multibody), the multi-body model's pose algebra,
motion PCA and ``jaxhet multibody``.

Ground truth: AdK (frame 0) split into CORE and LID+NMP; images are computed from the
ATOMS (analytic Fourier transform of Gaussian atoms), with the LID+NMP atoms rigidly moved
by a known per-image motion, so the refinement is checked against an independent forward
model.
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxhet.core import (CTFParams, axis_angle_to_matrix, ctf, gaussian_atoms_fourier, gaussian_atoms_volume,
                         image_frequencies, irfft2_centered, prepare_volume, random_rotations, render_fourier,
                         rotate_image_frequencies, rotation_angle_between, shift_phase)
from jaxhet.inference import (ArrayDataset, MultiBodyConfig, component_movie, init_multibody, mask_from_atoms,
                              motion_pca, multibody_step)
from jaxhet.models import MultiBodyModel, body_centers
import jaxhet.sim
from jaxhet.sim import load_structure

D, A_PX, SIG = 32, 4.0, 4.0


def _adk_bodies():
    st = load_structure("adk-transition")
    resid = np.load(os.path.join(os.path.dirname(jaxhet.sim.__file__), "data", "adk_dims_transition.npz"))["resid"]
    core = ((resid >= 1) & (resid <= 29)) | ((resid >= 60) & (resid <= 121)) | ((resid >= 160) & (resid <= 214))
    return st.coords_in_angstroms[0], st.masses, core


@pytest.fixture(scope="module")
def moved_lid():
    """N noise-free CTF'd images of AdK with LID+NMP rigidly moved per image (known)."""
    x, m, core = _adk_bodies()
    body2 = ~core
    c2 = (x[body2] * m[body2, None]).sum(0) / m[body2].sum()
    N = 32
    rng = np.random.default_rng(0)
    w_true = rng.uniform(-6, 6, (N, 3)).astype(np.float32)
    t_true = rng.uniform(-2, 2, (N, 3)).astype(np.float32)
    R = np.asarray(random_rotations(jax.random.key(1), N))
    du = rng.uniform(10000, 20000, N).astype(np.float32)
    ctfp = CTFParams.create(du, du, 0.0)
    k = jnp.asarray(image_frequencies(D, "half")) / (D * A_PX)
    sel = jnp.asarray(body2)

    @jax.jit
    def image(w, t, Ri, cp):  # analytic transform of the atoms, LID+NMP moved rigidly about c2
        Rb = axis_angle_to_matrix(jnp.deg2rad(w))
        xj = jnp.asarray(x)
        xm = jnp.where(sel[:, None], (xj - c2) @ Rb.T + c2 + t, xj)
        F = gaussian_atoms_fourier(xm, jnp.asarray(m), SIG, rotate_image_frequencies(k, Ri))
        return irfft2_centered(F * ctf(cp, k), D)

    imgs = [np.asarray(image(jnp.asarray(w_true[i]), jnp.asarray(t_true[i]), jnp.asarray(R[i]),
                             CTFParams(*[p[i] for p in ctfp]))) for i in range(N)]
    maps = np.stack([np.asarray(gaussian_atoms_volume(jnp.asarray(x[b]), jnp.asarray(m[b]), SIG, D, A_PX))
                     for b in (core, body2)])
    masks = np.stack([mask_from_atoms(x[b], D, A_PX) for b in (core, body2)])
    return dict(images=np.stack(imgs), R=R, ctf=ctfp, w=w_true, t=t_true, maps=maps, masks=masks, x=x, core=core)


def test_body_image_poses_match_the_model_fourier(rng):
    """Slicing a body at its effective pose (A R_b, s + (A d_b)_xy) equals rendering the
    model's moved body: the algebra multi-body backprojection relies on."""
    maps = rng.normal(size=(2, 16, 16, 16)).astype(np.float32) * 0.1
    f = np.arange(16) - 8
    g = np.exp(-(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2) / 8.0)
    maps = maps + np.stack([np.roll(g, 3, 2), np.roll(g, -3, 1)]).astype(np.float32)
    model = MultiBodyModel(16, 3.0, 2, body_maps=maps, rngs=nnx.Rngs(0))
    tau = jnp.asarray(np.concatenate([[0, 0, 0, 0, 0, 0], [7.0, -12.0, 20.0, 2.0, -1.5, 3.0]]), jnp.float32)
    A = jnp.asarray(random_rotations(jax.random.key(3), 1)[0])
    s = jnp.asarray([1.5, -0.5])
    cp = CTFParams.create(12000.0)
    full = jax.jit(lambda t: render_fourier(partial(model.fourier, t), A, s, cp, 16, 3.0))(tau)
    rots, shifts = model.body_image_poses(tau, A, s)
    k = jnp.asarray(image_frequencies(16, "half"))
    c = ctf(cp, k / (16 * 3.0))
    from jaxhet.core import gather_trilinear

    @jax.jit
    def sliced(vol, R, sb):  # the body map sliced at its effective pose (no model involved)
        vft = prepare_volume(vol)
        coords = rotate_image_frequencies(k, R) * (vft.padded_size / 16)
        return gather_trilinear(vft.spectrum, coords) * c * shift_phase(k, sb, 16)

    parts = [sliced(jnp.asarray(maps[b]), rots[b], shifts[b]) for b in range(2)]
    np.testing.assert_allclose(np.asarray(parts[0] + parts[1]), np.asarray(full),
                               atol=1e-4 * float(jnp.abs(full).max()))
    # body 1 did not move: its effective pose is the consensus pose
    np.testing.assert_allclose(np.asarray(rots[0]), np.asarray(A), atol=1e-6)
    np.testing.assert_allclose(np.asarray(shifts[0]), np.asarray(s), atol=1e-5)


def test_multibody_recovers_a_known_rigid_motion_noise_free(moved_lid):
    d = moved_lid
    src = ArrayDataset(d["images"], d["ctf"], A_PX, d["R"], None)
    cfg = MultiBodyConfig(sigma_rotation_in_degrees=20, sigma_translation_in_angstroms=10, update_body_maps=False,
                          gauss_newton_steps=8, initial_resolution_in_angstroms=2 * A_PX, batch_size=32)
    cen = body_centers(d["maps"], A_PX)
    st = init_multibody(src, d["masks"], consensus=d["maps"].sum(0), config=cfg, centers=cen,
                        noise_psd=np.full(D // 2 + 1, 1e-2, np.float32))
    st = st._replace(body_maps=d["maps"])
    for _ in range(2):
        st, stats = multibody_step(st, src, cfg)
    mot = st.motions
    R_est = np.asarray(axis_angle_to_matrix(jnp.deg2rad(mot[:, 1, :3])))
    R_true = np.asarray(axis_angle_to_matrix(jnp.deg2rad(d["w"])))
    err = np.asarray(rotation_angle_between(jnp.asarray(R_est), jnp.asarray(R_true)))
    true_angle = np.linalg.norm(d["w"], axis=1)
    assert np.median(err) < 0.3 and err.max() < 1.0, (np.median(err), err.max())
    assert np.median(true_angle) > 4.0  # the motions were not trivially small
    # the in-plane translation (the visible part) is recovered
    t_in = np.einsum("nij,nj->ni", d["R"], mot[:, 1, 3:])[:, :2]
    t_in_true = np.einsum("nij,nj->ni", d["R"], d["t"])[:, :2]
    assert np.median(np.linalg.norm(t_in - t_in_true, axis=1)) < 0.1
    # the CORE did not move
    assert np.abs(mot[:, 0, :3]).max() < 1.5 and np.median(np.abs(mot[:, 0, 3:])) < 0.2


def test_motion_pca_finds_the_direction_of_a_one_dimensional_motion(rng):
    N = 500
    s = rng.uniform(-1, 1, N)
    direction = np.array([0, 0, 8.0, 1.0, -2.0, 0, 0, 0, -4.0, 0, 0.5, 0])
    motions = (s[:, None] * direction + rng.normal(0, 0.3, (N, 12))).reshape(N, 2, 6) + 1.0
    pca = motion_pca(motions, 3)
    cosine = abs(pca.components[0] @ direction) / np.linalg.norm(direction)
    assert cosine > 0.99
    assert pca.explained_variance_ratio[0] > 0.8
    assert abs(np.corrcoef(pca.latents[:, 0], s)[0, 1]) > 0.99
    np.testing.assert_allclose(pca.mean, motions.reshape(N, -1).mean(0), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pca.components, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_component_movie_moves_only_the_moving_body(moved_lid):
    d = moved_lid
    N = 40
    s = np.linspace(-1, 1, N)
    motions = np.zeros((N, 2, 6), np.float32)
    motions[:, 1, 2] = 15.0 * s  # LID+NMP rotates about z
    pca = motion_pca(motions, 1)
    model = MultiBodyModel(D, A_PX, 2, body_maps=d["maps"], rngs=nnx.Rngs(0))
    maps, vals = component_movie(model, pca, 0, n_frames=3, percentiles=(0, 100))
    assert maps.shape == (3, D, D, D)
    np.testing.assert_allclose(vals, [pca.latents[:, 0].min(), 0.0, pca.latents[:, 0].max()], atol=1e-4)
    # the middle frame is the consensus (no motion; up to the projector's gridding correction,
    # a few % towards the box edge); the ends differ from it only inside body 2
    np.testing.assert_allclose(maps[1], d["maps"].sum(0), atol=0.04 * d["maps"].max())
    diff = np.abs(maps[0] - maps[1])
    inside = d["masks"][1] > 0.5
    assert diff[inside].sum() > 5 * diff[~inside].sum()


def test_mask_from_atoms_covers_the_atoms_and_nothing_far(rng):
    from conftest import random_ball_positions
    a_xyz = random_ball_positions(rng, 40, 8.0) + np.array([-24.0, 0, 0], np.float32)
    b_xyz = random_ball_positions(rng, 40, 8.0) + np.array([24.0, 4.0, 0], np.float32)
    mk = mask_from_atoms(a_xyz, D, A_PX)
    assert mk.dtype == np.float32 and mk.min() == 0.0 and mk.max() == 1.0
    ia = np.round(a_xyz / A_PX).astype(int) + D // 2
    assert np.all(mk[ia[:, 2], ia[:, 1], ia[:, 0]] > 0.99)
    # farther than the mask's reach (binary region + 1 px extension + 3 px soft edge):
    ib = np.round(b_xyz / A_PX).astype(int) + D // 2
    assert np.linalg.norm(b_xyz[:, None] - a_xyz[None], axis=-1).min() > 6 * A_PX
    assert np.all(mk[ib[:, 2], ib[:, 1], ib[:, 0]] == 0.0)
    # the soft edge is monotone between the two: 1 inside, decreasing outwards
    line = mk[D // 2, D // 2, D // 2 - 6:D // 2 + 8]
    assert np.all(np.diff(line) <= 1e-6)


def test_cli_multibody_writes_outputs(tmp_path, moved_lid):
    from jaxhet._errors import JaxhetInputError
    from jaxhet.cli import _multibody
    from jaxhet.io import ParticleTable, write_mrc, write_stack, write_star

    d = moved_lid
    n = len(d["images"])
    write_stack(str(tmp_path / "p.mrcs"), d["images"], A_PX)
    from jaxhet.core import matrix_to_euler
    table = ParticleTable.create(str(tmp_path / "p.mrcs"), euler_in_degrees=np.asarray(matrix_to_euler(d["R"])),
                                 defocus_u_in_angstroms=np.asarray(d["ctf"].defocus_u_in_angstroms),
                                 pixel_size_in_angstroms=A_PX, box_size=D, filename=str(tmp_path / "p.star"))
    write_star(str(tmp_path / "p.star"), table)
    for b in range(2):
        write_mrc(str(tmp_path / f"m{b}.mrc"), d["masks"][b], A_PX)
    write_mrc(str(tmp_path / "cons.mrc"), d["maps"].sum(0), A_PX)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    _multibody.register(sub)
    out = tmp_path / "out"
    argv = ["multibody", str(tmp_path / "p.star"), "--masks", str(tmp_path / "m0.mrc"), str(tmp_path / "m1.mrc"),
            "--consensus", str(tmp_path / "cons.mrc"), "-o", str(out), "--iters", "1", "--local-search", "0",
            "--gn-steps", "2", "--components", "1", "--movie-frames", "2", "-b", "32"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    lat = np.load(out / "latents.npy")
    mot = np.load(out / "body_motions.npy")
    assert lat.shape == (n, 1) and mot.shape == (n, 2, 6)
    for f in ("consensus.mrc", "body_1.mrc", "body_2.mrc", "pca.json", "multibody_model.npz",
              "movies/component_1_frame_01.mrc", "movies/component_1_frame_02.mrc", "movies/component_1.png"):
        assert (out / f).exists(), f
    from jaxhet.models import load_model
    mdl = load_model(str(out / "multibody_model.npz"))
    assert isinstance(mdl, MultiBodyModel) and mdl.latent_dim == 12
    with pytest.raises(JaxhetInputError):
        args = parser.parse_args(argv)
        args.func(args)
    with pytest.raises(JaxhetInputError):  # a mask on another grid
        write_mrc(str(tmp_path / "bad.mrc"), np.ones((20, 20, 20), np.float32), 1.0)
        args = parser.parse_args(argv[:3] + [str(tmp_path / "bad.mrc")] + argv[4:] + ["--force"])
        args.func(args)
