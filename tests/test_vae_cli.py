"""`jaxhet train vae`, `jaxhet eval-vol` (both routes) and `jaxhet analyze` on a tiny
on-disk dataset (RELION STAR + MRCS): files, shapes, box and voxel size."""

from __future__ import annotations

import json
import os
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_vae import make_two_state  # noqa: E402

from jaxhet.cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from jaxhet import io as jio
    from jaxhet.core import matrix_to_euler
    d = tmp_path_factory.mktemp("vae_cli")
    src, labels, _ = make_two_state(n=64, snr=2.0)
    jio.write_stack(str(d / "p.mrcs"), src.images, 4.0)
    eul = np.asarray(matrix_to_euler(src.rotations))
    t = jio.ParticleTable.create(str(d / "p.mrcs"), n=64, euler_in_degrees=eul,
                                 origin_in_pixels=src.origin_in_pixels,
                                 defocus_u_in_angstroms=np.asarray(src.ctf.defocus_u_in_angstroms),
                                 defocus_v_in_angstroms=np.asarray(src.ctf.defocus_v_in_angstroms),
                                 pixel_size_in_angstroms=4.0, box_size=16)
    jio.write_star(str(d / "p.star"), t)
    out = d / "out"
    rc = main(["train", "vae", str(d / "p.star"), "-o", str(out), "--zdim", "2", "--epochs", "1", "-b", "16",
               "--enc-dim", "32", "--dec-dim", "32", "--enc-layers", "1", "--dec-layers", "1", "--downsample", "8",
               "--no-progress"])
    assert rc == 0
    return d, out


def test_train_outputs(trained):
    d, out = trained
    z = np.load(out / "latents.npy")
    assert z.shape == (64, 2) and z.dtype == np.float32
    with open(out / "z.pkl", "rb") as f:
        np.testing.assert_array_equal(pickle.load(f), z)
    conf = json.load(open(out / "config.json"))
    assert conf["box_size"] == 8 and conf["pixel_size"] == 8.0  # trained on the downsampled images
    assert conf["data_box_size"] == 16 and conf["data_pixel_size"] == 4.0
    assert (out / "checkpoint.npz").exists() and (out / "model.npz").exists()
    # no silent overwrite: the same command again is an input error (exit code 2)
    assert main(["train", "vae", str(d / "p.star"), "-o", str(out), "--zdim", "2", "--epochs", "1",
                 "--no-progress"]) == 2


def test_eval_vol_writes_one_map_per_row_at_the_data_box_and_voxel_size(trained, tmp_path):
    from jaxhet.io import read_mrc
    d, out = trained
    zf = tmp_path / "z.npy"
    np.save(zf, np.array([[0.0, 0.0], [1.0, -1.0], [0.5, 2.0]], np.float32))
    assert main(["eval-vol", str(out), "--latents", str(zf), "-o", str(tmp_path / "v")]) == 0
    files = sorted(os.listdir(tmp_path / "v"))
    assert files == ["vol_000.mrc", "vol_001.mrc", "vol_002.mrc"]
    vols = [read_mrc(str(tmp_path / "v" / f)) for f in files]
    for v, a in vols:
        assert v.shape == (16, 16, 16) and a == pytest.approx(4.0)
    assert not np.allclose(vols[0][0], vols[1][0])  # the latent matters
    # the model was trained at box 8: the box-16 map is its Fourier-padded map (no content beyond Nyquist 8)
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vols[1][0])))
    k = np.arange(16) - 8
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    assert np.abs(f[r > 4.01]).max() < 1e-4 * np.abs(f).max()
    # wrong latent width -> input error
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    assert main(["eval-vol", str(out), "--latents", str(tmp_path / "bad.npy"), "-o", str(tmp_path / "w")]) == 2
    # reconstruction from the images nearest a latent: data box and voxel size
    assert main(["eval-vol", str(out), "--latents", str(zf), "-o", str(tmp_path / "r"), "--reconstruct",
                 "--n-nearest", "40"]) == 0
    v, a = read_mrc(str(tmp_path / "r" / "reconstruct_000.mrc"))
    assert v.shape == (16, 16, 16) and a == pytest.approx(4.0)
    rep = json.load(open(tmp_path / "r" / "reconstruct.json"))
    assert len(rep) == 3 and all(r["n_images"] == 40 for r in rep)


def test_analyze_writes_plots_maps_and_summary(trained, tmp_path):
    d, out = trained
    o = tmp_path / "an"
    assert main(["analyze", str(out), "-o", str(o), "-k", "3", "--n-traj", "4", "--knn", "8", "--no-umap"]) == 0
    s = json.load(open(o / "summary.json"))
    for f in ["pca.png", "landscape.png", "kmeans/centers.npy", "kmeans/vol_002.mrc", "trajectory/vol_003.mrc",
              "trajectory/latents.npy"]:
        assert (o / f).exists(), f
    assert sum(s["kmeans_sizes"]) == 64 and len(s["pca_explained_variance_ratio"]) == 2
    tz = np.load(o / "trajectory" / "latents.npy")
    z = np.load(out / "latents.npy")
    np.testing.assert_allclose(tz[0], z[s["trajectory"]["start_index"]], atol=1e-6)
    np.testing.assert_allclose(tz[-1], z[s["trajectory"]["end_index"]], atol=1e-6)
    assert "disabled" in s["umap"]
