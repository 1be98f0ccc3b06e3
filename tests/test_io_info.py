"""``jaxhet info`` and the agreement of the I/O layer's float64 rotations with jaxhet.core."""

from __future__ import annotations

import argparse
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxhet._errors import JaxhetInputError
from jaxhet.cli import _info
from jaxhet.core import _rotations as core_rot
from jaxhet.io import write_mrc, write_stack
from jaxhet.io._geometry import (axis_angle_to_matrix_np, euler_to_matrix_np,
                                 matrix_to_axis_angle_np, matrix_to_euler_np)

DATA = os.path.join(os.path.dirname(__file__), "data", "cryodrgn")


def _info_out(capsys, path, *extra) -> dict:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    _info.register(sub)
    args = parser.parse_args(["info", str(path), *extra])
    assert args.func is _info.run
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        lines[k.strip()] = v.strip()
    return lines


def test_info_stack(tmp_path, capsys, rng):
    imgs = (3.0 + 2.0 * rng.normal(size=(50, 24, 24))).astype(np.float32)
    write_stack(tmp_path / "p.mrcs", imgs, 1.75)
    d = _info_out(capsys, tmp_path / "p.mrcs", "--n-images", "10")
    assert d["kind"] == "image stack" and d["images"] == "50"
    assert d["box"] == "24 x 24 px" and d["pixel size"] == "1.75 A" and d["dtype"] == "float32 (mode 2)"
    mean, std = (float(x) for x in d["mean / std (first 10)"].split("/"))
    assert mean == pytest.approx(imgs[:10].mean(), rel=1e-5) and std == pytest.approx(imgs[:10].std(), rel=1e-5)


def test_info_map(tmp_path, capsys):
    vol = np.zeros((16, 16, 16), np.float32)
    vol[8, 8, 8] = 5.0
    write_mrc(tmp_path / "m.mrc", vol, 2.0)
    d = _info_out(capsys, tmp_path / "m.mrc")
    assert d["kind"] == "3D map" and d["voxel size"] == "2 A" and d["min / max"] == "0 / 5"


def test_info_star_cs_pkl(capsys):
    d = _info_out(capsys, os.path.join(DATA, "particles_31.star"))
    assert d["kind"] == "STAR, RELION 3.1+" and d["particles"] == "20" and d["optics groups"] == "2"
    assert d["pixel size"] == "1.2, 1.5 A" and d["box"] == "64 px" and d["poses"] == "present"
    assert d["group 2"].startswith("8 particles, 200 kV")
    assert d["defocus U"] == "9082.86 .. 24474.4 A"
    d = _info_out(capsys, os.path.join(DATA, "particles_30.star"))
    assert d["kind"] == "STAR, RELION 3.0" and d["pixel size"] == "1.5 A"
    d = _info_out(capsys, os.path.join(DATA, "particles.cs"))
    assert d["kind"] == "cryoSPARC .cs" and d["particles"] == "20" and d["poses"] == "present"
    d = _info_out(capsys, os.path.join(DATA, "cryodrgn_star31_pose.pkl"))
    assert d["kind"] == "cryoDRGN poses pkl" and d["particles"] == "20"
    assert float(d["rotations"].split("=")[1].split(",")[0]) < 1e-6
    d = _info_out(capsys, os.path.join(DATA, "cryodrgn_star31_ctf.pkl"))
    assert d["kind"] == "cryoDRGN ctf pkl" and d["box"] == "64 px" and d["voltage"] == "200, 300 kV"


def test_info_errors(tmp_path, capsys):
    args = argparse.Namespace(file=str(tmp_path / "x.star"), n_images=10)
    with pytest.raises(JaxhetInputError, match=r"x\.star: no such file"):
        _info.run(args)
    (tmp_path / "x.h5").write_text("")
    with pytest.raises(JaxhetInputError, match=r"x\.h5: unknown file type '\.h5'"):
        _info.run(argparse.Namespace(file=str(tmp_path / "x.h5"), n_images=10))
    # through the real command line: one line on stderr, exit status 2
    from jaxhet.cli.main import main
    (tmp_path / "t.mrcs").write_bytes(b"\x00" * 100)
    assert main(["info", str(tmp_path / "t.mrcs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t.mrcs: truncated or corrupt MRC file" in err[0]


def test_numpy_rotations_agree_with_core(rng):
    euler = np.stack([rng.uniform(-180, 180, 100), np.rad2deg(np.arccos(rng.uniform(-1, 1, 100))),
                      rng.uniform(-180, 180, 100)], -1)
    euler[:3, 1] = [0.0, 180.0, 90.0]
    A = euler_to_matrix_np(euler)
    np.testing.assert_allclose(A, np.asarray(core_rot.euler_to_matrix(jnp.asarray(euler, jnp.float32))), atol=2e-6)
    e2 = matrix_to_euler_np(A)
    np.testing.assert_allclose(euler_to_matrix_np(e2), A, atol=1e-12)
    np.testing.assert_allclose(e2[3:], np.asarray(core_rot.matrix_to_euler(jnp.asarray(A, jnp.float32)))[3:], atol=5e-3)
    v = matrix_to_axis_angle_np(A)
    np.testing.assert_allclose(axis_angle_to_matrix_np(v), A, atol=1e-12)
    np.testing.assert_allclose(axis_angle_to_matrix_np(v),
                               np.asarray(core_rot.axis_angle_to_matrix(jnp.asarray(v, jnp.float32))), atol=2e-6)
