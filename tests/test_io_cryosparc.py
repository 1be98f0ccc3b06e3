"""cryoSPARC .cs files: pose/shift convention, exact round trips, edits, fresh writes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxhet._errors import JaxhetInputError
from jaxhet.io import (ParticleTable, cs_pose_to_relion, read_cs, read_particles, read_star,
                       relion_to_cs_pose, write_cs)
from jaxhet.io._geometry import euler_to_matrix_np

DATA = os.path.join(os.path.dirname(__file__), "data", "cryodrgn")
CS = os.path.join(DATA, "particles.cs")
STAR31 = os.path.join(DATA, "particles_31.star")


def test_cs_fixture_describes_the_same_particles_as_the_star_fixture():
    """The fixture .cs encodes the STAR poses as pose = rotvec(A^T), shift = origin px."""
    c, s = read_cs(CS), read_star(STAR31)
    assert len(c) == len(s) == 20 and c.has_poses
    np.testing.assert_allclose(c.rotation_matrices(), s.rotation_matrices(), atol=1e-6)
    np.testing.assert_allclose(c.origin_in_pixels, s.origin_in_pixels, atol=1e-6)
    np.testing.assert_allclose(c.defocus_u_in_angstroms, s.defocus_u_in_angstroms, rtol=1e-7)
    np.testing.assert_allclose(c.defocus_angle_in_degrees, s.defocus_angle_in_degrees, atol=1e-5)
    np.testing.assert_allclose(c.phase_shift_in_degrees, s.phase_shift_in_degrees, atol=1e-5)
    np.testing.assert_allclose(c.pixel_size_in_angstroms, s.pixel_size_in_angstroms, rtol=1e-7)
    np.testing.assert_allclose(c.voltage_in_kilovolts, s.voltage_in_kilovolts)
    np.testing.assert_array_equal(c.optics_group, s.optics_group)  # exp_group_id + 1
    np.testing.assert_array_equal(c.stack_indices, s.stack_indices)
    np.testing.assert_array_equal(c.box_size, 64)
    # a leading '>' in blob/path is dropped
    assert [os.path.abspath(p) for p in c.stack_paths] == [os.path.abspath(p) for p in s.stack_paths]


def test_pose_convention_functions():
    rng = np.random.default_rng(3)
    euler = np.stack([rng.uniform(-180, 180, 50), np.rad2deg(np.arccos(rng.uniform(-1, 1, 50))),
                      rng.uniform(-180, 180, 50)], -1)
    origin = rng.uniform(-10, 10, (50, 2))
    pose, shift = relion_to_cs_pose(euler, origin)
    # Rodrigues(pose) is the transpose of RELION's A
    R = Rotation.from_rotvec(pose).as_matrix()
    np.testing.assert_allclose(np.swapaxes(R, 1, 2), euler_to_matrix_np(euler), atol=1e-12)
    np.testing.assert_array_equal(shift, origin)
    e2, o2 = cs_pose_to_relion(pose, shift)
    np.testing.assert_allclose(euler_to_matrix_np(e2), euler_to_matrix_np(euler), atol=1e-12)
    np.testing.assert_array_equal(o2, origin)


def test_unchanged_round_trip_is_exact(tmp_path):
    shutil.copy(CS, tmp_path / "p.cs")
    t = read_cs(tmp_path / "p.cs")
    write_cs(tmp_path / "q.cs", t)
    a = np.load(tmp_path / "p.cs")
    b = np.load(tmp_path / "q.cs")
    assert a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()
    assert (tmp_path / "q.cs").exists() and not (tmp_path / "q.cs.npy").exists()


def test_edits_and_subset(tmp_path):
    shutil.copy(CS, tmp_path / "p.cs")
    t = read_cs(tmp_path / "p.cs")
    t.euler_in_degrees[2] = [10.0, 80.0, -30.0]
    t.origin_in_pixels[4] = [1.5, -0.5]
    t.defocus_angle_in_degrees[6] = 45.0
    sub = t.subset([6, 4, 2, 0])
    write_cs(tmp_path / "s.cs", sub)
    a = np.load(tmp_path / "p.cs")[[6, 4, 2, 0]]
    b = np.load(tmp_path / "s.cs")
    for name in a.dtype.names:
        if name not in ("alignments3D/pose", "alignments3D/shift", "ctf/df_angle_rad"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_array_equal(b["alignments3D/pose"][[0, 1, 3]], a["alignments3D/pose"][[0, 1, 3]])
    np.testing.assert_array_equal(b["alignments3D/shift"][[0, 2, 3]], a["alignments3D/shift"][[0, 2, 3]])
    np.testing.assert_array_equal(b["alignments3D/shift"][1], np.float32([1.5, -0.5]))
    assert b["ctf/df_angle_rad"][0] == np.float32(np.deg2rad(45.0))
    back = read_cs(tmp_path / "s.cs")
    np.testing.assert_allclose(back.rotation_matrices()[2], euler_to_matrix_np([10.0, 80.0, -30.0]), atol=2e-7)


def test_fresh_write_from_a_star_table(tmp_path):
    s = read_star(STAR31)
    write_cs(tmp_path / "from_star.cs", s)
    c = read_cs(tmp_path / "from_star.cs")
    np.testing.assert_allclose(c.rotation_matrices(), s.rotation_matrices(), atol=1e-6)
    np.testing.assert_allclose(c.origin_in_pixels, s.origin_in_pixels, atol=1e-6)
    np.testing.assert_allclose(c.defocus_v_in_angstroms, s.defocus_v_in_angstroms, rtol=1e-7)
    np.testing.assert_array_equal(c.optics_group, s.optics_group)
    assert [os.path.abspath(p) for p in c.stack_paths] == [os.path.abspath(p) for p in s.stack_paths]
    # and the fixture .cs, read and compared field by field with this one
    ref = np.load(CS)
    got = np.load(tmp_path / "from_star.cs")
    np.testing.assert_allclose(got["ctf/df1_A"], ref["ctf/df1_A"])
    np.testing.assert_allclose(got["alignments3D/shift"], ref["alignments3D/shift"], atol=1e-6)
    Rg = Rotation.from_rotvec(got["alignments3D/pose"].astype(float)).as_matrix()
    Rr = Rotation.from_rotvec(ref["alignments3D/pose"].astype(float)).as_matrix()
    np.testing.assert_allclose(Rg, Rr, atol=1e-6)


def test_read_particles_dispatches_cs():
    t = read_particles(CS)
    assert len(t) == 20 and t.source["format"] == "cs"


def test_bad_cs_files(tmp_path):
    with pytest.raises(JaxhetInputError, match=r"nope\.cs: no such file"):
        read_cs(tmp_path / "nope.cs")
    (tmp_path / "junk.cs").write_bytes(b"not numpy at all")
    with pytest.raises(JaxhetInputError, match=r"junk\.cs: not a cryoSPARC \.cs file"):
        read_cs(tmp_path / "junk.cs")
    with open(tmp_path / "plain.cs", "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(JaxhetInputError, match=r"plain\.cs: not a cryoSPARC \.cs file"):
        read_cs(tmp_path / "plain.cs")
    a = np.load(CS)
    keep = [n for n in a.dtype.names if n not in ("ctf/df1_A", "blob/psize_A")]
    with open(tmp_path / "missing.cs", "wb") as f:
        np.save(f, a[keep])
    with pytest.raises(JaxhetInputError, match=r"missing\.cs: missing fields blob/psize_A, ctf/df1_A"):
        read_cs(tmp_path / "missing.cs")
    t = read_cs(CS)
    write_cs(tmp_path / "x.cs", t)
    with pytest.raises(JaxhetInputError, match=r"x\.cs: file exists"):
        write_cs(tmp_path / "x.cs", t)
    nc = ParticleTable.create("a.mrcs", n=2, pixel_size_in_angstroms=1.0, box_size=8)
    with pytest.raises(JaxhetInputError, match=r"y\.cs: the particles have no CTF"):
        write_cs(tmp_path / "y.cs", nc)
