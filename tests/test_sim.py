"""Simulator: ground truth written consistently with the images and the field's formats."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxhet import JaxhetInputError
from jaxhet.core import gaussian_atoms_projection, CTFParams, ctf, rfft2_centered, irfft2_centered, image_frequencies
from jaxhet.sim import SimulationParams, load_structure, simulate_dataset, simulate_images


@pytest.fixture(scope="module")
def small_sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    params = SimulationParams(n_images=64, box_size=48, pixel_size=3.0, snr=0.0, max_shift_in_pixels=3.0,
                              frames=[0, 97], seed=3)
    ds = simulate_dataset(str(out), "adk-transition", params)
    return ds, params


def test_bundled_structures():
    s = load_structure("adk-transition")
    assert s.coords_in_angstroms.shape == (98, 1656, 3)
    # one centre for the whole path: the mean over all frames is at the origin, motion kept
    assert np.allclose(s.coords_in_angstroms.reshape(-1, 3).mean(0), 0, atol=1e-3)
    ca = np.sqrt(((s.coords_in_angstroms[0] - s.coords_in_angstroms[97]) ** 2).sum(-1))
    assert ca.max() > 10  # LID/NMP move by > 10 A
    assert load_structure("adk-closed").n_frames == 1
    pdb = load_structure("adk-open-pdb")
    assert pdb.coords_in_angstroms.shape[1] > 1600 and set(np.unique(pdb.elements)) <= {"C", "N", "O", "S"}
    with pytest.raises(JaxhetInputError, match="nope.pdb"):
        load_structure("nope.pdb")


def test_written_files_agree_with_ground_truth(small_sim):
    from jaxhet.io import read_particles, open_stack, read_mrc

    ds, params = small_sim
    labels = np.load(ds.labels)
    assert set(np.unique(labels)) <= {0, 97} and len(labels) == 64
    table = read_particles(ds.star)
    table_pkl = read_particles(ds.stack, poses=ds.poses_pkl, ctf=ds.ctf_pkl)
    np.testing.assert_allclose(table.rotation_matrices(), table_pkl.rotation_matrices(), atol=1e-5)
    np.testing.assert_allclose(table.origin_in_pixels, table_pkl.origin_in_pixels, atol=1e-4)
    stack = open_stack(ds.stack)
    # the STAR names the stack relative to its own folder, so the images are found from anywhere
    assert "@particles.mrcs" in open(ds.star).read()
    from jaxhet.io import ParticleDataset
    (b,) = list(ParticleDataset(table).batches(64))
    np.testing.assert_array_equal(b.images, stack[np.arange(64)])
    assert stack.shape == (64, 48, 48) and abs(stack.voxel_size - 3.0) < 1e-5
    st = load_structure("adk-transition")
    sig = params.sigma()
    # each noise-free image is the CTF'd analytic projection of its frame's atoms, shifted by -origin
    for i in [0, 5, 17]:
        A = table.rotation_matrices()[i]
        proj = gaussian_atoms_projection(st.coords_in_angstroms[labels[i]], st.masses, sig, jnp.asarray(A), 48, 3.0,
                                         -jnp.asarray(table.origin_in_pixels[i]))
        k = jnp.asarray(image_frequencies(48, "half")) / (48 * 3.0)
        c = ctf(CTFParams(*[jnp.asarray(x[i]) for x in table.ctf_params()]), k)
        ref = irfft2_centered(rfft2_centered(proj) * c, 48)
        img = stack[i]
        rel = float(np.linalg.norm(img - ref) / np.linalg.norm(ref))
        assert rel < 0.02, rel
    vol, vs = read_mrc(ds.gt_map_path(97))
    assert vol.shape == (48, 48, 48) and abs(vs - 3.0) < 1e-5
    assert abs(vol.sum() - st.masses.sum()) / st.masses.sum() < 1e-3
    cfg = json.load(open(os.path.join(ds.out_dir, "sim_config.json")))
    assert cfg["n_images"] == 64 and cfg["structure"] == "adk-transition"


def test_snr_and_population():
    st = load_structure("adk-transition")
    p = SimulationParams(n_images=400, box_size=32, pixel_size=4.0, snr=0.05, frames=[0, 50, 97],
                         population=[0.6, 0.3, 0.1], seed=1)
    imgs, meta, sigma = simulate_images(st, p)
    clean, _, _ = simulate_images(st, SimulationParams(**{**p.__dict__, "snr": 0.0}))
    assert abs(np.var(clean) / np.var(imgs - clean) - 0.05) / 0.05 < 0.05
    frac = np.array([(meta.labels == f).mean() for f in (0, 50, 97)])
    assert np.allclose(frac, [0.6, 0.3, 0.1], atol=0.07)
    # uniform orientations: cos(tilt) uniform on [-1, 1]
    ct = np.cos(np.deg2rad(meta.euler_in_degrees[:, 1]))
    assert abs(ct.mean()) < 0.1 and abs(np.mean(ct ** 2) - 1 / 3) < 0.05


def test_refuses_to_overwrite_and_bad_box(tmp_path, small_sim):
    ds, params = small_sim
    with pytest.raises(JaxhetInputError, match="already holds"):
        simulate_dataset(ds.out_dir, "adk-transition", params)
    with pytest.raises(JaxhetInputError, match="smaller than the molecule"):
        simulate_dataset(str(tmp_path / "x"), "adk-transition", SimulationParams(n_images=4, box_size=16, pixel_size=2.0))


def test_cli_simulate(tmp_path):
    from jaxhet.cli.main import main
    out = tmp_path / "cli"
    rc = main(["simulate", "-o", str(out), "-n", "8", "--box", "32", "--pixel-size", "4", "--frames", "0-1",
               "--gt-maps", "none"])
    assert rc == 0 and (out / "particles.star").exists() and (out / "particles.png").exists()
    assert main(["simulate", "-o", str(out), "-n", "8", "--box", "32", "--pixel-size", "4"]) == 2
