"""cryoDRGN pkls: agreement with pkls cryoDRGN itself wrote (tests/data/cryodrgn, made by
experiments/make_cryodrgn_fixtures.py), round trips, stack + pkl reading, and a live
rerun of cryoDRGN when it is installed."""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import shutil

import numpy as np
import pytest

from jaxhet._errors import JaxhetInputError
from jaxhet.io import (ParticleTable, read_ctf_pkl, read_particles, read_poses_pkl, read_star,
                       table_from_cryodrgn, table_to_cryodrgn_ctf, table_to_cryodrgn_poses,
                       write_ctf_pkl, write_poses_pkl, write_stack, write_star)

DATA = os.path.join(os.path.dirname(__file__), "data", "cryodrgn")
FIXTURES = {  # input file, cryoDRGN's pkls, box to supply (3.0 STAR has none)
    "star31": ("particles_31.star", None),
    "star30": ("particles_30.star", 64),
    "cs": ("particles.cs", None),
}


def _load(name):
    with open(os.path.join(DATA, name), "rb") as f:
        return pickle.load(f)


def _table(key):
    fn, box = FIXTURES[key]
    t = read_particles(os.path.join(DATA, fn))
    if box is not None:
        t.box_size[:] = box
    return t


@pytest.mark.parametrize("key", list(FIXTURES))
def test_poses_agree_with_cryodrgn_fixture(key):
    rot_ref, trans_ref = _load(f"cryodrgn_{key}_pose.pkl")
    rot, trans = table_to_cryodrgn_poses(_table(key))
    assert rot.dtype == np.float32 and trans.dtype == np.float32
    assert rot.shape == (20, 3, 3) and trans.shape == (20, 2)
    np.testing.assert_allclose(rot, rot_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(trans, trans_ref, atol=1e-7, rtol=0)
    assert np.abs(rot - rot_ref).max() < 1e-6  # in fact to float32 rounding


@pytest.mark.parametrize("key", list(FIXTURES))
def test_ctf_agrees_exactly_with_cryodrgn_fixture(key):
    ref = _load(f"cryodrgn_{key}_ctf.pkl")
    ctf = table_to_cryodrgn_ctf(_table(key))
    assert ctf.dtype == np.float32 and ref.dtype == np.float32
    np.testing.assert_array_equal(ctf, ref)


@pytest.mark.parametrize("key", list(FIXTURES))
def test_reading_cryodrgn_pkls_gives_the_original_poses(key):
    t = _table(key)
    rot_ref, trans_ref = _load(f"cryodrgn_{key}_pose.pkl")
    back = t.copy()
    back.euler_in_degrees[:] = 0
    from jaxhet.io import apply_cryodrgn_poses
    back = apply_cryodrgn_poses(back, rot_ref, trans_ref)
    np.testing.assert_allclose(back.rotation_matrices(), t.rotation_matrices(), atol=1e-6)
    np.testing.assert_allclose(back.origin_in_pixels, t.origin_in_pixels, atol=1e-5)


def test_cryodrgn_rot_is_relion_A_and_trans_is_origin_over_box():
    t = read_star(os.path.join(DATA, "particles_31.star"))
    rot_ref, trans_ref = _load("cryodrgn_star31_pose.pkl")
    # no transpose: cryoDRGN's rot equals RELION's A
    np.testing.assert_allclose(rot_ref, t.rotation_matrices(), atol=1e-6)
    # same sign as RELION's origin, divided by the box (64)
    np.testing.assert_allclose(trans_ref, t.origin_in_pixels / 64, atol=1e-8)
    # the pixel origin from rlnOriginXAngst uses each particle's optics-group pixel size
    g2 = t.optics_group == 2
    assert g2.any() and (t.pixel_size_in_angstroms[g2] == 1.2).all()


def test_pkl_round_trips(tmp_path, rng):
    rot = np.asarray(table_to_cryodrgn_poses(read_star(os.path.join(DATA, "particles_31.star")))[0])
    trans = rng.uniform(-0.1, 0.1, (20, 2)).astype(np.float32)
    write_poses_pkl(tmp_path / "p.pkl", rot, trans)
    r2, t2 = read_poses_pkl(tmp_path / "p.pkl")
    np.testing.assert_array_equal(r2, rot)
    np.testing.assert_array_equal(t2, trans)
    with open(tmp_path / "p.pkl", "rb") as f:
        obj = pickle.load(f)
    assert isinstance(obj, tuple) and obj[0].dtype == np.float32 and obj[1].dtype == np.float32
    ctf = _load("cryodrgn_star31_ctf.pkl")
    write_ctf_pkl(tmp_path / "c.pkl", ctf)
    np.testing.assert_array_equal(read_ctf_pkl(tmp_path / "c.pkl"), ctf)
    with pytest.raises(JaxhetInputError, match=r"c\.pkl: file exists"):
        write_ctf_pkl(tmp_path / "c.pkl", ctf)


def test_stack_plus_pkls(tmp_path, rng):
    imgs = rng.normal(size=(20, 64, 64)).astype(np.float32)
    write_stack(tmp_path / "p.mrcs", imgs, pixel_size_A=9.9)  # header pixel size is overridden by the ctf pkl
    shutil.copy(os.path.join(DATA, "cryodrgn_star31_pose.pkl"), tmp_path / "pose.pkl")
    shutil.copy(os.path.join(DATA, "cryodrgn_star31_ctf.pkl"), tmp_path / "ctf.pkl")
    t = read_particles(tmp_path / "p.mrcs", poses=tmp_path / "pose.pkl", ctf=tmp_path / "ctf.pkl")
    s = read_star(os.path.join(DATA, "particles_31.star"))
    assert len(t) == 20 and t.has_poses and t.has_ctf
    np.testing.assert_array_equal(t.stack_indices, np.arange(20))
    np.testing.assert_allclose(t.rotation_matrices(), s.rotation_matrices(), atol=1e-6)
    np.testing.assert_allclose(t.origin_in_pixels, s.origin_in_pixels, atol=1e-5)
    np.testing.assert_allclose(t.pixel_size_in_angstroms, s.pixel_size_in_angstroms, rtol=1e-7)
    np.testing.assert_allclose(t.defocus_u_in_angstroms, s.defocus_u_in_angstroms, rtol=1e-7)
    # and written back as pkls: the same numbers
    np.testing.assert_array_equal(table_to_cryodrgn_ctf(t), _load("cryodrgn_star31_ctf.pkl"))
    # a stack alone: header pixel size and box, no poses, no CTF
    bare = read_particles(tmp_path / "p.mrcs")
    assert bare.box == 64 and bare.pixel_size == pytest.approx(9.9) and not bare.has_poses and not bare.has_ctf
    # a .txt list of stacks
    write_stack(tmp_path / "q.mrcs", imgs[:5], pixel_size_A=9.9)
    (tmp_path / "list.txt").write_text("p.mrcs\nq.mrcs\n")
    lst = read_particles(tmp_path / "list.txt")
    assert len(lst) == 25 and lst.stack_indices[20] == 0 and lst.stack_paths[24].endswith("q.mrcs")


def test_table_from_cryodrgn_arrays():
    rot, trans = _load("cryodrgn_star31_pose.pkl")
    ctf = _load("cryodrgn_star31_ctf.pkl")
    t = table_from_cryodrgn("x.mrcs", rot=rot, trans=trans, ctf=ctf)
    assert len(t) == 20 and t.box == 64
    r2, t2 = table_to_cryodrgn_poses(t)
    np.testing.assert_allclose(r2, rot, atol=1e-6)
    np.testing.assert_allclose(t2, trans, atol=1e-7)


def test_bad_pkl_inputs(tmp_path, rng):
    imgs = rng.normal(size=(5, 64, 64)).astype(np.float32)
    write_stack(tmp_path / "p.mrcs", imgs, 1.0)
    shutil.copy(os.path.join(DATA, "cryodrgn_star31_pose.pkl"), tmp_path / "pose.pkl")
    with pytest.raises(JaxhetInputError, match=r"pose\.pkl: 20 poses for 5 particles in .*p\.mrcs"):
        read_particles(tmp_path / "p.mrcs", poses=tmp_path / "pose.pkl")
    write_ctf_pkl(tmp_path / "ctf.pkl", np.tile(_load("cryodrgn_star31_ctf.pkl")[:1], (5, 1)) * [2] + [0] * 9)
    with pytest.raises(JaxhetInputError, match=r"ctf\.pkl: box size 128 disagrees with 64"):
        read_particles(tmp_path / "p.mrcs", ctf=tmp_path / "ctf.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"junk")
    with pytest.raises(JaxhetInputError, match=r"junk\.pkl: not a pickle file"):
        read_poses_pkl(tmp_path / "junk.pkl")
    with open(tmp_path / "wrong.pkl", "wb") as f:
        pickle.dump(np.zeros((4, 5)), f)
    with pytest.raises(JaxhetInputError, match=r"wrong\.pkl: not a cryoDRGN ctf pkl"):
        read_ctf_pkl(tmp_path / "wrong.pkl")
    with pytest.raises(JaxhetInputError, match=r"wrong\.pkl: rotations have shape"):
        read_poses_pkl(tmp_path / "wrong.pkl")
    with pytest.raises(JaxhetInputError, match=r"missing\.pkl: no such file"):
        read_ctf_pkl(tmp_path / "missing.pkl")
    with pytest.raises(JaxhetInputError, match=r"data\.h5: unknown particle file format '\.h5'"):
        read_particles(tmp_path / "data.h5")
    with pytest.raises(JaxhetInputError, match=r"pose\.pkl: a \.pkl holds only poses or CTF"):
        read_particles(tmp_path / "pose.pkl")


# --------------------------------------------------------------------------- live cryoDRGN
HAVE_CRYODRGN = importlib.util.find_spec("cryodrgn") is not None


def _pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _run_cryodrgn(module: str, argv: list[str]) -> None:
    import importlib
    mod = importlib.import_module(f"cryodrgn.commands.{module}")
    parser = argparse.ArgumentParser()
    mod.add_args(parser)
    mod.main(parser.parse_args(argv))


@pytest.mark.skipif(not HAVE_CRYODRGN, reason="cryodrgn is not installed")
def test_live_cryodrgn_on_fixtures_and_on_a_star_jaxhet_wrote(tmp_path, rng):
    for fn in ("particles_31.star", "particles.cs"):
        shutil.copy(os.path.join(DATA, fn), tmp_path / fn)
    o = lambda name: str(tmp_path / name)  # noqa: E731
    _run_cryodrgn("parse_pose_star", [o("particles_31.star"), "-o", o("s_pose.pkl")])
    _run_cryodrgn("parse_ctf_star", [o("particles_31.star"), "-o", o("s_ctf.pkl")])
    _run_cryodrgn("parse_pose_csparc", [o("particles.cs"), "-o", o("c_pose.pkl")])
    _run_cryodrgn("parse_ctf_csparc", [o("particles.cs"), "-o", o("c_ctf.pkl")])
    for mine, ref in (("s", "star31"), ("c", "cs")):
        r_live, t_live = _pickle(o(f"{mine}_pose.pkl"))
        r_fix, t_fix = _load(f"cryodrgn_{ref}_pose.pkl")
        np.testing.assert_allclose(r_live, r_fix, atol=1e-6)
        np.testing.assert_allclose(t_live, t_fix, atol=1e-8)
        np.testing.assert_array_equal(_pickle(o(f"{mine}_ctf.pkl")), _load(f"cryodrgn_{ref}_ctf.pkl"))

    # a new random data set, written by jaxhet, read by cryoDRGN
    n = 40
    euler = np.stack([rng.uniform(-180, 180, n), np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
                      rng.uniform(-180, 180, n)], -1)
    g = np.where(np.arange(n) < 25, 1, 2)
    t = ParticleTable.create(
        o("stack.mrcs"), np.arange(n), euler_in_degrees=euler, origin_in_pixels=rng.uniform(-8, 8, (n, 2)),
        defocus_u_in_angstroms=rng.uniform(8000, 30000, n), defocus_v_in_angstroms=rng.uniform(8000, 30000, n),
        defocus_angle_in_degrees=rng.uniform(-180, 180, n), phase_shift_in_degrees=rng.uniform(0, 90, n),
        optics_group=g, voltage_in_kilovolts=np.where(g == 1, 300.0, 200.0),
        spherical_aberration_in_mm=np.where(g == 1, 2.7, 1.4), amplitude_contrast=np.where(g == 1, 0.1, 0.07),
        pixel_size_in_angstroms=np.where(g == 1, 1.31, 0.97), box_size=96)
    write_star(o("jaxhet.star"), t)
    _run_cryodrgn("parse_pose_star", [o("jaxhet.star"), "-o", o("j_pose.pkl")])
    _run_cryodrgn("parse_ctf_star", [o("jaxhet.star"), "-o", o("j_ctf.pkl")])
    rot, trans = _pickle(o("j_pose.pkl"))
    mine_rot, mine_trans = table_to_cryodrgn_poses(t)
    np.testing.assert_allclose(rot, mine_rot, atol=1e-6)
    np.testing.assert_allclose(trans, mine_trans, atol=1e-7)
    np.testing.assert_array_equal(_pickle(o("j_ctf.pkl")), table_to_cryodrgn_ctf(t))
