"""RELION STAR files: 3.0 / 3.1 / multi-optics / RELION 5 reading, exact round trips,
edits, subsets, fresh writes, origin units, and bad input."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import starfile

from jaxhet._errors import JaxhetInputError
from jaxhet.io import ParticleTable, read_star, write_stack, write_star
from jaxhet.io._geometry import euler_to_matrix_np

DATA = os.path.join(os.path.dirname(__file__), "data", "cryodrgn")
STAR31 = os.path.join(DATA, "particles_31.star")
STAR30 = os.path.join(DATA, "particles_30.star")

RELION5 = """
# version 50001

data_general

_rlnNrClasses                             1
_rlnSomeComment                   "a b"

# version 50001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImagePixelSize #7
_rlnImageSize #8
_rlnImageDimensionality #9
_rlnCtfDataAreCtfPremultiplied #10
opticsGroup1            1     0.885000   300.000000     2.700000     0.100000     1.770000          128            2            0
opticsGroup2            2     0.885000   300.000000     2.700000     0.100000     1.770000          128            2            0
opticsGroup3            3     0.830000   200.000000     1.400000     0.070000     1.660000          128            2            0


# version 50001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnClassNumber #3
_rlnAnglePsi #4
_rlnAutopickFigureOfMerit #5
_rlnImageName #6
_rlnMicrographName #7
_rlnOpticsGroup #8
_rlnCtfMaxResolution #9
_rlnCtfFigureOfMerit #10
_rlnDefocusU #11
_rlnDefocusV #12
_rlnDefocusAngle #13
_rlnCtfBfactor #14
_rlnCtfScalefactor #15
_rlnPhaseShift #16
_rlnAngleRot #17
_rlnAngleTilt #18
_rlnOriginXAngst #19
_rlnOriginYAngst #20
_rlnNormCorrection #21
_rlnLogLikeliContribution #22
_rlnMaxValueProbDistribution #23
_rlnNrOfSignificantSamples #24
_rlnRandomSubset #25
_rlnGroupName #26
  1734.000000  2043.000000            1   -80.497757     2.386473 000001@Extract/job012/Movies/FoilHole_0001.mrcs MotionCorr/job002/Movies/FoilHole_0001.mrc            1     3.658119     0.168312 10842.152344 10509.548828    -7.862574     0.000000     1.000000     0.000000   -96.134171    62.962685     1.212380    -3.887620     0.893117 3.076538e+05     0.045817            3            1 001
   566.000000   262.000000            1  -168.262955     0.744396 000002@Extract/job012/Movies/FoilHole_0001.mrcs MotionCorr/job002/Movies/FoilHole_0001.mrc            1     3.658119     0.168312 10822.496094 10489.892578    -7.862574     0.000000     1.000000     0.000000    66.315735   117.651833    -6.292380     2.887620     0.910284 3.071458e+05     0.123457            5            2 001
  2810.000000  1790.000000            1    10.000000     1.000000 000001@Extract/job012/Movies/FoilHole_0002.mrcs MotionCorr/job002/Movies/FoilHole_0002.mrc            2     4.000000     0.200000 15000.000000 14000.000000    45.000000   -20.000000     1.000000     0.000000     0.000000     0.000000     0.000000     0.000000     0.900000 3.000000e+05     0.500000            1            1 002
  1200.000000   300.000000            1   170.000000     1.500000 000003@Extract/job012/Movies/FoilHole_0001.mrcs MotionCorr/job002/Movies/FoilHole_0003.mrc            3     4.000000     0.200000 20000.000000 19500.000000   -45.000000     0.000000     1.000000    30.500000   179.000000    90.000000     3.320000    -1.660000     0.900000 3.000000e+05     0.500000            1            2 003

"""


def _raw(path) -> dict:
    """Every block of a STAR file with every value as text (to compare files exactly)."""
    names = set()
    with open(path) as f:
        for line in f:
            if line.startswith("_"):
                names.add(line.split()[0][1:])
    return starfile.read(path, always_dict=True, parse_as_string=sorted(names))


def _assert_same_blocks(a, b):
    ra, rb = _raw(a), _raw(b)
    assert list(ra) == list(rb)
    for k in ra:
        if isinstance(ra[k], pd.DataFrame):
            assert list(ra[k].columns) == list(rb[k].columns), k
            pd.testing.assert_frame_equal(ra[k].reset_index(drop=True).astype(object),
                                          rb[k].reset_index(drop=True).astype(object), check_dtype=False)
        else:
            assert ra[k] == rb[k]


def _assert_tables_equal(a: ParticleTable, b: ParticleTable, origin_rtol=0.0):
    np.testing.assert_array_equal(a.stack_indices, b.stack_indices)
    assert [os.path.abspath(p) for p in a.stack_paths] == [os.path.abspath(p) for p in b.stack_paths]
    np.testing.assert_array_equal(a.euler_in_degrees, b.euler_in_degrees)
    np.testing.assert_allclose(a.origin_in_pixels, b.origin_in_pixels, rtol=origin_rtol, atol=1e-12 if origin_rtol else 0)
    for name in ["defocus_u_in_angstroms", "defocus_v_in_angstroms", "defocus_angle_in_degrees",
                 "phase_shift_in_degrees", "b_factor_in_angstroms2", "voltage_in_kilovolts",
                 "spherical_aberration_in_mm", "amplitude_contrast", "pixel_size_in_angstroms",
                 "box_size", "optics_group"]:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.has_poses == b.has_poses and a.has_ctf == b.has_ctf


# ------------------------------------------------------------------------- reading
def test_read_31_two_optics_groups_values():
    t = read_star(STAR31)
    assert len(t) == 20 and t.source["version"] == "3.1"
    assert sorted(set(t.optics_group.tolist())) == [1, 2]
    g2 = t.optics_group == 2
    np.testing.assert_array_equal(t.voltage_in_kilovolts, np.where(g2, 200.0, 300.0))
    np.testing.assert_array_equal(t.pixel_size_in_angstroms, np.where(g2, 1.2, 1.5))
    np.testing.assert_array_equal(t.spherical_aberration_in_mm, np.where(g2, 2.0, 2.7))
    np.testing.assert_array_equal(t.amplitude_contrast, np.where(g2, 0.07, 0.1))
    assert (t.box_size == 64).all() and t.box == 64
    # first row, checked against the text of the file
    assert t.stack_indices[0] == 0 and t.stack_paths[0].endswith(os.path.join("Extract", "job007", "stack_1.mrcs"))
    np.testing.assert_array_equal(t.euler_in_degrees[0], [45.034368, 117.697369, -102.488869])
    # rlnOriginXAngst / rlnImagePixelSize (1.5 A/px in group 1)
    np.testing.assert_allclose(t.origin_in_pixels[0], [1.891013 / 1.5, 2.483938 / 1.5], rtol=1e-15)
    assert t.defocus_u_in_angstroms[0] == 24474.371766
    with pytest.raises(JaxhetInputError, match=r"particles_31\.star: particles have different pixel sizes"):
        t.pixel_size
    assert t.subset(~g2).pixel_size == 1.5


def test_read_30_pixel_size_from_detector_and_magnification():
    t = read_star(STAR30)
    t31 = read_star(STAR31)
    assert t.source["version"] == "3.0" and t.source["layout"] == "3.0"
    assert t.pixel_size == 1.5  # 1.5 um * 1e4 / 10000
    # rlnOriginX in pixels: the same physical origins as the 3.1 file (rounded to 1e-6 px)
    np.testing.assert_allclose(t.origin_in_pixels, t31.origin_in_pixels * t31.pixel_size_in_angstroms[:, None] / 1.5,
                               atol=1e-6)
    np.testing.assert_array_equal(t.euler_in_degrees, t31.euler_in_degrees)
    assert (t.box_size == 0).all()  # no rlnImageSize and no stacks: unknown
    with pytest.raises(JaxhetInputError, match=r"particles_30\.star: image size unknown"):
        t.box


def test_read_30_box_from_stack_header(tmp_path, rng):
    (tmp_path / "Extract" / "job007").mkdir(parents=True)
    for g in (1, 2):
        write_stack(tmp_path / "Extract" / "job007" / f"stack_{g}.mrcs", np.zeros((10, 48, 48)), 1.5)
    shutil.copy(STAR30, tmp_path / "p.star")
    t = read_star(tmp_path / "p.star")
    assert t.box == 48
    assert os.path.isfile(t.stack_paths[0])


def test_project_relative_stack_names_resolve_via_parent_folders(tmp_path):
    # RELION names are relative to the project folder: Extract/job007/... inside Refine3D/job020/
    (tmp_path / "Extract" / "job007").mkdir(parents=True)
    (tmp_path / "Refine3D" / "job020").mkdir(parents=True)
    for g in (1, 2):
        write_stack(tmp_path / "Extract" / "job007" / f"stack_{g}.mrcs", np.zeros((10, 64, 64)), 1.5)
    shutil.copy(STAR31, tmp_path / "Refine3D" / "job020" / "run_data.star")
    t = read_star(tmp_path / "Refine3D" / "job020" / "run_data.star")
    assert all(os.path.isfile(p) for p in t.stack_paths)
    assert os.path.samefile(t.stack_paths[0], tmp_path / "Extract" / "job007" / "stack_1.mrcs")
    t2 = read_star(tmp_path / "Refine3D" / "job020" / "run_data.star", datadir=tmp_path / "Extract" / "job007")
    assert os.path.samefile(t2.stack_paths[-1], tmp_path / "Extract" / "job007" / "stack_2.mrcs")
    # written back in the same folder, or in another folder of the project, the
    # project-relative names still find the stacks, so they are kept as they were
    for out in (tmp_path / "Refine3D" / "job020" / "copy.star", tmp_path / "jaxhet_out" / "p.star"):
        out.parent.mkdir(exist_ok=True)
        write_star(out, t)
        _assert_same_blocks(tmp_path / "Refine3D" / "job020" / "run_data.star", out)
        assert [os.path.realpath(p) for p in read_star(out).stack_paths] == [os.path.realpath(p) for p in t.stack_paths]


def test_read_relion5_keeps_extra_columns_and_blocks(tmp_path):
    p = tmp_path / "run_data.star"
    p.write_text(RELION5)
    t = read_star(p)
    assert t.source["version"] == "5.0" and len(t) == 4
    np.testing.assert_array_equal(t.optics_group, [1, 1, 2, 3])
    np.testing.assert_array_equal(t.pixel_size_in_angstroms, [1.77, 1.77, 1.77, 1.66])
    np.testing.assert_array_equal(t.voltage_in_kilovolts, [300, 300, 300, 200])
    np.testing.assert_array_equal(t.b_factor_in_angstroms2, [0, 0, -20, 0])
    np.testing.assert_allclose(t.origin_in_pixels[3], [2.0, -1.0], rtol=1e-15)  # 3.32 A / 1.66 A/px
    np.testing.assert_array_equal(t.stack_indices, [0, 1, 0, 2])
    out = tmp_path / "out.star"
    write_star(out, t)  # default: the version it was read as
    _assert_same_blocks(p, out)
    assert out.read_text().startswith("# version 50001")
    write_star(tmp_path / "as31.star", t, version="3.1")
    _assert_same_blocks(p, tmp_path / "as31.star")
    assert (tmp_path / "as31.star").read_text().startswith("# version 30001")
    assert _raw(out)["particles"]["rlnGroupName"].tolist() == ["001", "001", "002", "003"]
    assert _raw(out)["general"]["rlnSomeComment"] == "a b"
    _assert_tables_equal(read_star(out), t)


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name, version", [("particles_31.star", "3.1"), ("particles_30.star", "3.0")])
def test_unchanged_round_trip_is_exact(tmp_path, name, version):
    shutil.copy(os.path.join(DATA, name), tmp_path / name)
    src = tmp_path / name
    t = read_star(src)
    out = tmp_path / "out.star"
    write_star(out, t, version=version)
    _assert_same_blocks(src, out)
    _assert_tables_equal(read_star(out), t)
    write_star(tmp_path / "default.star", t)  # default version: the source's
    _assert_same_blocks(src, tmp_path / "default.star")


def test_round_trip_to_another_folder_keeps_stack_files(tmp_path):
    t = read_star(STAR31)  # its stacks do not exist: names are re-expressed from the new folder
    out = tmp_path / "out.star"
    write_star(out, t)
    ra, rb = _raw(STAR31), _raw(out)
    pd.testing.assert_frame_equal(ra["optics"], rb["optics"], check_dtype=False)
    cols = [c for c in ra["particles"].columns if c != "rlnImageName"]
    pd.testing.assert_frame_equal(ra["particles"][cols], rb["particles"][cols], check_dtype=False)
    back = read_star(out)
    assert [os.path.abspath(p) for p in back.stack_paths] == [os.path.abspath(p) for p in t.stack_paths]
    _assert_tables_equal(back, t)


def test_same_folder_round_trip_keeps_names_text(tmp_path):
    shutil.copy(STAR31, tmp_path / "a.star")
    t = read_star(tmp_path / "a.star")
    write_star(tmp_path / "b.star", t)
    ra, rb = _raw(tmp_path / "a.star"), _raw(tmp_path / "b.star")
    assert ra["particles"]["rlnImageName"].tolist() == rb["particles"]["rlnImageName"].tolist()
    _assert_same_blocks(tmp_path / "a.star", tmp_path / "b.star")


def test_edits_are_written_and_everything_else_kept(tmp_path):
    shutil.copy(STAR31, tmp_path / "in.star")
    t = read_star(tmp_path / "in.star")
    t.euler_in_degrees[3] = [10.0, 20.123456789012, 30.0]
    t.origin_in_pixels[5] = [1.25, -2.5]
    t.defocus_u_in_angstroms[7] += 100.0
    t.phase_shift_in_degrees[0] = 12.5
    out = tmp_path / "edit.star"
    write_star(out, t)
    back = read_star(out)
    _assert_tables_equal(back, t, origin_rtol=1e-14)
    np.testing.assert_array_equal(back.euler_in_degrees[3], [10.0, 20.123456789012, 30.0])
    # origin written in A: px * 1.5 A/px (group 1)
    raw = _raw(out)["particles"]
    assert float(raw["rlnOriginXAngst"][5]) == 1.25 * 1.5 and float(raw["rlnOriginYAngst"][5]) == -2.5 * 1.5
    orig = _raw(tmp_path / "in.star")["particles"]
    changed = {(3, "rlnAngleRot"), (3, "rlnAngleTilt"), (3, "rlnAnglePsi"), (5, "rlnOriginXAngst"),
               (5, "rlnOriginYAngst"), (7, "rlnDefocusU"), (0, "rlnPhaseShift"), (3, "rlnOriginXAngst")}
    for c in orig.columns:
        for i in range(len(orig)):
            if (i, c) not in changed:
                assert raw[c][i] == orig[c][i], (i, c)
    assert raw["rlnImageName"][0] != "" and raw["rlnClassNumber"].tolist() == orig["rlnClassNumber"].tolist()


def test_subset_writes_selected_rows_with_all_columns(tmp_path):
    t = read_star(STAR31)
    sel = np.array([19, 4, 11, 0])
    sub = t.subset(sel)
    out = tmp_path / "sub.star"
    write_star(out, sub)
    raw, orig = _raw(out)["particles"], _raw(STAR31)["particles"]
    assert list(raw.columns) == list(orig.columns) and len(raw) == 4
    for c in orig.columns:
        if c != "rlnImageName":
            assert raw[c].tolist() == orig[c].iloc[sel].tolist(), c
    _assert_tables_equal(read_star(out), sub)
    # the optics block is kept as it was
    pd.testing.assert_frame_equal(_raw(out)["optics"], _raw(STAR31)["optics"], check_dtype=False)


def test_changed_optics_rebuild_the_optics_block(tmp_path):
    t = read_star(STAR31)
    t.voltage_in_kilovolts[:3] = 120.0  # part of group 1 changes voltage: a group is split
    out = tmp_path / "o.star"
    write_star(out, t)
    back = read_star(out)
    np.testing.assert_array_equal(back.voltage_in_kilovolts, t.voltage_in_kilovolts)
    np.testing.assert_array_equal(back.pixel_size_in_angstroms, t.pixel_size_in_angstroms)
    np.testing.assert_allclose(back.origin_in_pixels, t.origin_in_pixels, rtol=1e-14)
    assert len(np.unique(back.optics_group)) == 3


def test_fresh_table_write_read_31_and_30(tmp_path, rng):
    n = 9
    euler = np.stack([rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], -1)
    t = ParticleTable.create(
        [str(tmp_path / f"s{i % 2}.mrcs") for i in range(n)], np.arange(n) // 2,
        euler_in_degrees=euler, origin_in_pixels=rng.uniform(-5, 5, (n, 2)),
        defocus_u_in_angstroms=rng.uniform(1e4, 2e4, n), defocus_v_in_angstroms=rng.uniform(1e4, 2e4, n),
        defocus_angle_in_degrees=rng.uniform(-90, 90, n), phase_shift_in_degrees=0.0,
        b_factor_in_angstroms2=rng.uniform(0, 50, n), optics_group=np.where(np.arange(n) < 4, 1, 2),
        voltage_in_kilovolts=np.where(np.arange(n) < 4, 300.0, 200.0), spherical_aberration_in_mm=2.7,
        amplitude_contrast=0.1, pixel_size_in_angstroms=np.where(np.arange(n) < 4, 1.1, 1.3), box_size=96)
    for version in ("3.1", "3.0", "5.0"):
        out = tmp_path / f"fresh_{version}.star"
        write_star(out, t, version=version)
        back = read_star(out)
        assert back.source["layout"] == ("3.0" if version == "3.0" else "3.1")
        np.testing.assert_array_equal(back.euler_in_degrees, t.euler_in_degrees)
        np.testing.assert_allclose(back.origin_in_pixels, t.origin_in_pixels, rtol=1e-14, atol=1e-14)
        for name in ["defocus_u_in_angstroms", "defocus_v_in_angstroms", "defocus_angle_in_degrees",
                     "b_factor_in_angstroms2", "voltage_in_kilovolts", "pixel_size_in_angstroms", "box_size"]:
            np.testing.assert_array_equal(getattr(back, name), getattr(t, name), err_msg=name)
        assert [os.path.abspath(p) for p in back.stack_paths] == [os.path.abspath(p) for p in t.stack_paths]
        np.testing.assert_array_equal(back.stack_indices, t.stack_indices)
    assert "# version 30001" in (tmp_path / "fresh_3.1.star").read_text()
    assert "rlnOriginX\n" not in (tmp_path / "fresh_3.1.star").read_text()
    raw30 = _raw(tmp_path / "fresh_3.0.star")
    assert list(raw30) == [""] and "rlnOriginX" in raw30[""] and "rlnOriginXAngst" not in raw30[""]


def test_convert_31_to_30_keeps_extra_columns(tmp_path):
    t = read_star(STAR31).subset(np.arange(12))  # one optics group
    out = tmp_path / "as30.star"
    write_star(out, t, version="3.0")
    back = read_star(out)
    assert back.source["layout"] == "3.0"
    np.testing.assert_allclose(back.origin_in_pixels, t.origin_in_pixels, rtol=1e-14)
    np.testing.assert_array_equal(back.euler_in_degrees, t.euler_in_degrees)
    raw = _raw(out)[""]
    assert raw["rlnMicrographName"].tolist() == _raw(STAR31)["particles"]["rlnMicrographName"][:12].tolist()
    # px origins in 3.0 equal A origins / pixel size in 3.1
    np.testing.assert_allclose(raw["rlnOriginX"].astype(float), _raw(STAR31)["particles"]["rlnOriginXAngst"][:12].astype(float) / 1.5, rtol=1e-14)


def test_origin_sign_and_units(tmp_path):
    """rlnOriginXAngst = +3 A at 1.5 A/px is +2 px (no sign flip); the rotation is RELION's A."""
    text = """
data_optics
loop_
_rlnOpticsGroup
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnImagePixelSize
_rlnImageSize
1 300 2.7 0.1 1.5 32

data_particles
loop_
_rlnImageName
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
_rlnOriginXAngst
_rlnOriginYAngst
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnOpticsGroup
1@s.mrcs 90 90 0 3.0 -1.5 10000 10000 0 1
"""
    p = tmp_path / "o.star"
    p.write_text(text)
    t = read_star(p)
    np.testing.assert_array_equal(t.origin_in_pixels, [[2.0, -1.0]])
    A = t.rotation_matrices()[0]
    # rot=90, tilt=90, psi=0: A rows (0, 0, -1), (-1, 0, 0), (0, 1, 0) by the RELION formula
    np.testing.assert_allclose(A, [[0, 0, -1], [-1, 0, 0], [0, 1, 0]], atol=1e-7)
    np.testing.assert_allclose(t.rotation_matrices(), euler_to_matrix_np(t.euler_in_degrees), atol=1e-7)
    assert t.phase_shift_in_degrees[0] == 0 and t.b_factor_in_angstroms2[0] == 0


def test_no_poses_file(tmp_path):
    text = "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n_rlnVoltage\n" \
           "_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnImagePixelSize\n" \
           "1@a.mrcs 1e4 1e4 0 300 2.7 0.1 2.0\n2@a.mrcs 2e4 2e4 0 300 2.7 0.1 2.0\n"
    p = tmp_path / "np.star"
    p.write_text(text)
    t = read_star(p)
    assert not t.has_poses and np.isnan(t.euler_in_degrees).all()
    assert (t.origin_in_pixels == 0).all()
    np.testing.assert_array_equal(t.defocus_u_in_angstroms, [1e4, 2e4])


# ------------------------------------------------------------------------- bad input
def _write_without(tmp_path, cols, block="particles"):
    raw = _raw(STAR31)
    raw[block] = raw[block].drop(columns=cols)
    p = tmp_path / "bad.star"
    starfile.write(raw, p)
    return p


def test_missing_column_is_named(tmp_path):
    p = _write_without(tmp_path, ["rlnDefocusU"])
    with pytest.raises(JaxhetInputError, match=r"^.*bad\.star: missing column rlnDefocusU$"):
        read_star(p)
    p = _write_without(tmp_path, ["rlnDefocusV", "rlnAngleTilt"])
    with pytest.raises(JaxhetInputError, match=r"bad\.star: missing columns rlnDefocusV, rlnAngleTilt"):
        read_star(p)
    p = _write_without(tmp_path, ["rlnVoltage"], block="optics")
    with pytest.raises(JaxhetInputError, match=r"bad\.star: missing column rlnVoltage"):
        read_star(p)
    p = _write_without(tmp_path, ["rlnImagePixelSize"], block="optics")
    with pytest.raises(JaxhetInputError, match=r"bad\.star: missing column rlnImagePixelSize"):
        read_star(p)
    p = _write_without(tmp_path, ["rlnImageName"])
    with pytest.raises(JaxhetInputError, match=r"bad\.star: missing column rlnImageName"):
        read_star(p)
    p = _write_without(tmp_path, ["rlnOpticsGroup"])  # two optics groups: needed
    with pytest.raises(JaxhetInputError, match=r"bad\.star: missing column rlnOpticsGroup"):
        read_star(p)


def test_bad_values(tmp_path):
    raw = _raw(STAR31)
    raw["particles"].loc[2, "rlnDefocusU"] = "abc"
    starfile.write(raw, tmp_path / "v.star")
    with pytest.raises(JaxhetInputError, match=r"v\.star: column rlnDefocusU .* 'abc' \(row 3\)"):
        read_star(tmp_path / "v.star")
    raw = _raw(STAR31)
    raw["particles"].loc[1, "rlnImageName"] = "000000@x.mrcs"
    starfile.write(raw, tmp_path / "i.star")
    with pytest.raises(JaxhetInputError, match=r"i\.star: bad rlnImageName '000000@x.mrcs' in row 2"):
        read_star(tmp_path / "i.star")
    raw = _raw(STAR31)
    raw["particles"].loc[4, "rlnOpticsGroup"] = "7"
    starfile.write(raw, tmp_path / "g.star")
    with pytest.raises(JaxhetInputError, match=r"g\.star: optics group 7 of particle 5 is not in data_optics"):
        read_star(tmp_path / "g.star")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(JaxhetInputError, match=r"nothere\.star: no such file"):
        read_star(tmp_path / "nothere.star")
    (tmp_path / "empty.star").write_text("# nothing\n")
    with pytest.raises(JaxhetInputError, match=r"empty\.star: no data blocks"):
        read_star(tmp_path / "empty.star")


def test_inconsistent_box_is_an_error(tmp_path):
    raw = _raw(STAR31)
    raw["optics"].loc[1, "rlnImageSize"] = "128"
    starfile.write(raw, tmp_path / "box.star")
    t = read_star(tmp_path / "box.star")
    with pytest.raises(JaxhetInputError, match=r"box\.star: particles have different box sizes \(64, 128 px\)"):
        t.box
    assert t.subset(t.optics_group == 2).box == 128


def test_write_refuses_overwrite_and_tables_without_ctf(tmp_path):
    t = read_star(STAR31)
    out = tmp_path / "x.star"
    write_star(out, t)
    with pytest.raises(JaxhetInputError, match=r"x\.star: file exists"):
        write_star(out, t)
    write_star(out, t, overwrite=True)
    nc = ParticleTable.create("a.mrcs", n=3, pixel_size_in_angstroms=1.0, box_size=32)
    with pytest.raises(JaxhetInputError, match=r"y\.star: the particles have no CTF"):
        write_star(tmp_path / "y.star", nc)
    with pytest.raises(JaxhetInputError, match="unknown STAR version"):
        write_star(tmp_path / "z.star", t, version="2.0")
