"""3D classification (jaxhet.inference._classify) and ``jaxhet classify``.

Ground truth: AdK closed (frame 0) and open (frame 97) particles simulated in memory;
the classes must be recovered per image, the per-class likelihoods must equal the core's
Gaussian log-likelihood of the rendered images, empty classes must be re-seeded, local
searches must move perturbed poses towards the truth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhet.core import (CTFParams, euler_to_matrix, gaussian_log_likelihood, irfft2_centered, perturb_rotations,
                         prepare_volume, project_volume, rfft2_centered, rotation_angle_between)
from jaxhet.inference import ArrayDataset, ClassificationConfig, classification_step, classify, \
    class_log_likelihood_batch, frequency_set, init_classification
from jaxhet.sim import SimulationParams, ground_truth_map, load_structure, simulate_images

D, A_PX = 24, 5.0


@pytest.fixture(scope="module")
def two_states():
    st = load_structure("adk-transition")
    p = SimulationParams(n_images=600, box_size=D, pixel_size=A_PX, snr=0.2, frames=[0, 97], seed=3)
    images, meta, sigma = simulate_images(st, p)
    R = np.asarray(euler_to_matrix(jnp.asarray(meta.euler_in_degrees)))
    maps = np.stack([ground_truth_map(st, f, D, A_PX) for f in (0, 97)])
    return dict(images=images, R=R, meta=meta, sigma=sigma, maps=maps, labels=(meta.labels == 97).astype(int))


def _accuracy(pred, labels):
    return max(np.mean(pred == labels), np.mean(pred != labels))


def test_classification_separates_two_conformations(two_states):
    d = two_states
    src = ArrayDataset(d["images"], d["meta"].ctf, A_PX, d["R"], d["meta"].origin_in_pixels)
    cfg = ClassificationConfig(n_classes=2, batch_size=128, seed=1)
    state, hist = classify(src, config=cfg, n_iterations=7)
    acc = _accuracy(state.class_probs.argmax(1), d["labels"])
    assert acc >= 0.95, acc
    np.testing.assert_allclose(state.class_probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(state.class_priors.sum(), 1.0, atol=1e-5)
    assert abs(state.class_priors[0] - 0.5) < 0.1
    # the resolution limit grew from the initial 30 A; the noise spectrum was re-estimated
    # from residuals and is close to the true white noise variance at high frequency
    assert state.max_radius > D * A_PX / 30.0
    hi = state.noise_psd[D // 4:D // 2]
    assert np.all(np.abs(hi / d["sigma"] ** 2 - 1) < 0.15), hi / d["sigma"] ** 2
    # each class map is closer to its own ground truth than to the other state's
    k_of_open = int(np.round(np.mean(state.class_probs.argmax(1)[d["labels"] == 1])))
    cc = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])  # noqa: E731
    assert cc(state.maps[k_of_open], d["maps"][1]) > cc(state.maps[k_of_open], d["maps"][0])
    assert cc(state.maps[1 - k_of_open], d["maps"][0]) > cc(state.maps[1 - k_of_open], d["maps"][1])
    # converged: few images still change class
    assert hist[-1].changed_fraction < 0.02


def test_class_log_likelihoods_equal_the_core_gaussian_likelihood(two_states, rng):
    d = two_states
    n = 6
    spectra = jnp.stack([prepare_volume(jnp.asarray(m)).spectrum for m in d["maps"]])
    fs = frequency_set(D)
    psd = rng.uniform(0.5, 2.0, D // 2 + 1).astype(np.float32) * d["sigma"] ** 2
    r_lim = 9.0
    from jaxhet.inference._classify import _lik_weight
    lw = _lik_weight(fs, psd, r_lim, D)
    dR = np.concatenate([np.eye(3, dtype=np.float32)[None],
                         np.asarray(perturb_rotations(jax.random.key(2), jnp.tile(jnp.eye(3), (2, 1, 1)), 5.0))])
    dS = np.array([[0.0, 0.0], [1.0, -0.5]], np.float32)
    shifts = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    ctf = CTFParams(*[jnp.asarray(np.asarray(x)[:n]) for x in d["meta"].ctf])
    lik = jax.jit(class_log_likelihood_batch, static_argnums=(13, 14))
    out = lik(spectra, jnp.asarray(d["images"][:n]), jnp.asarray(d["R"][:n]), jnp.asarray(shifts), ctf,
              jnp.asarray(lw), jnp.asarray(fs.freqs), jnp.asarray(fs.flat_index), jnp.asarray(dR), jnp.asarray(dS),
              jnp.zeros((3, 2)), jnp.float32(A_PX), D, 2)
    ll = np.asarray(out["log_lik"])  # [n, K, M, S]
    # the same numbers from the core: log N(Y | c T_s P_{A dR} V_k, psd) on the frequencies 0 < |k| <= r_lim
    from jaxhet.core import half_frequency_grid_2d, psd_to_half_grid
    kk = half_frequency_grid_2d(D)
    rad = np.sqrt((kk ** 2).sum(-1))
    mask = jnp.asarray(((rad <= r_lim) & (rad > 0)).astype(np.float32))
    psd_grid = psd_to_half_grid(jnp.asarray(psd), D)
    want = np.zeros_like(ll)
    vfts = [prepare_volume(jnp.asarray(m)) for m in d["maps"]]

    @jax.jit
    def core_ll(spectrum, y, R, s, ci):
        from jaxhet.core import VolumeFT
        model = project_volume(VolumeFT(spectrum, D, 2), R, s, ci, A_PX)
        return gaussian_log_likelihood(y, model, psd_grid, mask)

    for i in range(n):
        y = rfft2_centered(jnp.asarray(d["images"][i]))
        ci = CTFParams(*[x[i] for x in ctf])
        for k in range(2):
            for m in range(3):
                for s in range(2):
                    want[i, k, m, s] = float(core_ll(vfts[k].spectrum, y, jnp.asarray(d["R"][i] @ dR[m]),
                                                     jnp.asarray(shifts[i] + dS[s]), ci))
    # equal up to a per-image constant (the |Y|^2 and log-normaliser terms)
    got = ll - ll[:, :1, :1, :1]
    exp = want - want[:, :1, :1, :1]
    np.testing.assert_allclose(got, exp, rtol=1e-3, atol=1e-3 * np.abs(exp).max())
    assert np.abs(exp).max() > 50  # the differences are large: a wrong formula would show


@pytest.mark.slow
def test_empty_class_is_reseeded_by_splitting_the_largest(two_states):
    d = two_states
    src = ArrayDataset(d["images"], d["meta"].ctf, A_PX, d["R"], d["meta"].origin_in_pixels)
    cfg = ClassificationConfig(n_classes=3, batch_size=128)
    st = init_classification(src, cfg)
    maps = st.maps.copy()
    maps[2] = 0.0  # a class nobody can prefer
    st = st._replace(maps=maps)
    new, stats = classification_step(st, src, cfg)
    assert stats.class_sizes[2] < 1.0
    assert stats.reseeded == [2]
    j = int(np.argmax(stats.class_sizes))
    assert np.abs(new.maps[2]).max() > 0
    np.testing.assert_allclose(new.class_priors[2], new.class_priors[j], rtol=1e-6)
    np.testing.assert_allclose(new.class_priors.sum(), 1.0, atol=1e-5)
    # the two halves of the split class are its two half maps: similar, not identical
    cc = np.corrcoef(new.maps[2].ravel(), new.maps[j].ravel())[0, 1]
    assert 0.5 < cc < 0.9999, cc


@pytest.mark.slow
def test_local_search_moves_perturbed_poses_towards_the_truth(two_states):
    d = two_states
    n = 96
    R_true = jnp.asarray(d["R"][:n])
    R_bad = np.asarray(perturb_rotations(jax.random.key(7), R_true, 4.0))
    err0 = np.asarray(rotation_angle_between(jnp.asarray(R_bad), R_true))
    ctf = CTFParams(*[np.asarray(x)[:n] for x in d["meta"].ctf])
    # noise-free images of the two states, so the poses are well determined
    st_maps = d["maps"]
    clean = np.stack([np.asarray(irfft2_centered(project_volume(prepare_volume(jnp.asarray(st_maps[d["labels"][i]])),
                                                                R_true[i], None, CTFParams(*[x[i] for x in ctf]), A_PX),
                                                 D)) for i in range(n)])
    src = ArrayDataset(clean, ctf, A_PX, R_bad, None)
    cfg = ClassificationConfig(n_classes=2, local_search_in_degrees=6.0, local_step_in_degrees=2.0, batch_size=32)
    st = init_classification(src, cfg)
    st = st._replace(maps=st_maps.astype(np.float32), max_radius=D / 2 - 1,
                     noise_psd=np.full(D // 2 + 1, 1e-2, np.float32))
    new, stats = classification_step(st, src, cfg)
    err1 = np.asarray(rotation_angle_between(jnp.asarray(new.rotations), R_true))
    assert np.median(err1) < 0.5 * np.median(err0), (np.median(err0), np.median(err1))
    assert stats.mean_pose_change_in_degrees > 1.0
    assert _accuracy(new.class_probs.argmax(1), d["labels"][:n]) == 1.0


def test_cli_classify_writes_outputs_and_refuses_to_overwrite(tmp_path):
    from jaxhet.cli import _classify
    from jaxhet.sim import simulate_dataset
    import argparse
    import starfile

    data = tmp_path / "data"
    simulate_dataset(str(data), "adk-transition", SimulationParams(n_images=120, box_size=24, pixel_size=5.0,
                                                                   snr=1.0, frames=[0, 97], seed=5))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    _classify.register(sub)
    out = tmp_path / "out"
    argv = ["classify", str(data / "particles.star"), "--datadir", str(data), "-k", "2", "-o", str(out), "--iters", "3",
            "-b", "128"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    classes = np.load(out / "classes.npy")
    probs = np.load(out / "class_probs.npy")
    assert classes.shape == (120,) and probs.shape == (120, 2)
    np.testing.assert_array_equal(classes, probs.argmax(1))
    labels = (np.load(data / "labels.npy") == 97).astype(int)
    assert _accuracy(classes, labels) >= 0.9
    for k in (1, 2):
        assert (out / f"class_{k}.mrc").exists()
    assert (out / "classes.png").stat().st_size > 0
    star = starfile.read(out / "particles.star", always_dict=True)
    np.testing.assert_array_equal(star["particles"]["rlnClassNumber"].to_numpy(), classes + 1)
    # refuses to overwrite without --force (the error the CLI prints), works with it
    from jaxhet._errors import JaxhetInputError
    with pytest.raises(JaxhetInputError):
        args = parser.parse_args(argv)
        args.func(args)
    args = parser.parse_args(argv + ["--force"])
    assert args.func(args) == 0
