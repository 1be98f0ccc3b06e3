"""``jaxhet covariance`` and ``jaxhet train ppca`` on a small simulated AdK data set: the
files they write, the saved ``linear`` model read back by ``jaxhet eval-vol``, and no
silent overwrite."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from jaxhet._errors import JaxhetInputError


def _parser(*modules):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    for m in modules:
        m.register(sub)
    return p


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from jaxhet.sim import SimulationParams, simulate_dataset
    d = str(tmp_path_factory.mktemp("linear_cli") / "sim")
    params = SimulationParams(n_images=300, box_size=16, pixel_size=8.0, snr=0.5, seed=3)
    simulate_dataset(d, "adk-transition", params)
    return d


def test_covariance_and_ppca_cli_write_their_files(sim, tmp_path):
    from jaxhet import io as jio
    from jaxhet.cli import _covariance, _evalvol, _train
    from jaxhet.models import LinearModel, load_model

    out1 = str(tmp_path / "cov")
    p = _parser(_covariance)
    args = p.parse_args(["covariance", os.path.join(sim, "particles.star"), "--datadir", sim, "-o", out1, "--k", "2",
                         "--radius", "3", "--cg-iter", "3", "--movie-frames", "3"])
    assert args.func(args) == 0
    z = np.load(os.path.join(out1, "latents.npy"))
    assert z.shape == (300, 2) and np.all(np.isfinite(z)) and z[:, 0].std() > 0
    assert np.load(os.path.join(out1, "latents_cov.npy")).shape == (300, 2, 2)
    for f in ["mean.mrc", "mask.mrc", "component_1.mrc", "component_2.mrc", "movies/pc1/frame_02.mrc",
              "movies/pc2/values.json", "model.npz", "config.json"]:
        assert os.path.exists(os.path.join(out1, f)), f
    m = load_model(os.path.join(out1, "model.npz"))
    assert isinstance(m, LinearModel) and m.latent_dim == 2 and m.box_size == 16
    mean, _ = jio.read_mrc(os.path.join(out1, "mean.mrc"))
    np.testing.assert_allclose(np.asarray(m.volume(np.zeros(2, np.float32))), mean, atol=1e-6)
    with pytest.raises(JaxhetInputError):  # never overwrite silently
        args.func(args)

    out2 = str(tmp_path / "ppca")
    p = _parser(_train, _evalvol)
    args = p.parse_args(["train", "ppca", os.path.join(sim, "particles.mrcs"), "--poses", os.path.join(sim, "poses.pkl"),
                         "--ctf", os.path.join(sim, "ctf.pkl"), "-o", out2, "--k", "1", "--iters", "2", "--cg-iter", "2",
                         "--radius", "3", "--spectral", "--nodes", "3", "--bandwidth", "0.2", "--movie-frames", "2"])
    assert args.func(args) == 0
    z = np.load(os.path.join(out2, "latents.npy"))
    assert z.shape == (300, 1)
    conf = json.load(open(os.path.join(out2, "config.json")))
    assert conf["method"] == "ppca" and conf["data_box_size"] == 16 and len(conf["log_evidence"]) >= 1
    assert os.path.exists(os.path.join(out2, "checkpoint.npz"))
    assert np.load(os.path.join(out2, "spectral", "u.npy")).shape == (300,)
    assert os.path.exists(os.path.join(out2, "spectral", "node_02.mrc"))
    # eval-vol reads the saved linear model: V(z) = X_0 + z X_1
    zs = np.array([[-1.0], [2.0]], np.float32)
    np.save(tmp_path / "z.npy", zs)
    args = p.parse_args(["eval-vol", out2, "--latents", str(tmp_path / "z.npy"), "-o", str(tmp_path / "maps")])
    assert args.func(args) == 0
    v, _ = jio.read_mrc(str(tmp_path / "maps" / "vol_001.mrc"))
    x0, _ = jio.read_mrc(os.path.join(out2, "mean.mrc"))
    x1, _ = jio.read_mrc(os.path.join(out2, "component_1.mrc"))
    np.testing.assert_allclose(v, x0 + 2.0 * x1, atol=1e-5 * np.abs(x0).max())
