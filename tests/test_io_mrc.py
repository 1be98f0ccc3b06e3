"""MRC maps and MRCS stacks: round trips, float16, memory-mapped indexing, bad input."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from jaxhet._errors import JaxhetInputError
from jaxhet.io import (create_stack, open_stack, read_mrc, read_mrc_header, write_mrc,
                       write_stack)


def test_map_round_trip_keeps_values_and_voxel_size(tmp_path, rng):
    vol = rng.normal(size=(12, 10, 8)).astype(np.float32)
    p = tmp_path / "map.mrc"
    write_mrc(p, vol, voxel_size_A=1.37)
    out, vs = read_mrc(p)
    assert out.dtype == np.float32 and out.shape == (12, 10, 8)  # [z, y, x]
    np.testing.assert_array_equal(out, vol)
    assert vs == pytest.approx(1.37, rel=1e-6)
    with mrcfile.open(p) as m:  # the header says x = last axis
        assert (int(m.header.nx), int(m.header.ny), int(m.header.nz)) == (8, 10, 12)


def test_write_refuses_to_overwrite(tmp_path):
    p = tmp_path / "map.mrc"
    write_mrc(p, np.zeros((4, 4, 4)), 1.0)
    with pytest.raises(JaxhetInputError, match="map.mrc: file exists"):
        write_mrc(p, np.ones((4, 4, 4)), 1.0)
    write_mrc(p, np.ones((4, 4, 4)), 2.0, overwrite=True)
    out, vs = read_mrc(p)
    assert out.sum() == 64 and vs == 2.0
    with pytest.raises(JaxhetInputError, match="stack.mrcs: file exists"):
        write_stack(tmp_path / "stack.mrcs", np.zeros((2, 4, 4)), 1.0)
        write_stack(tmp_path / "stack.mrcs", np.zeros((2, 4, 4)), 1.0)


def test_stack_round_trip_and_header(tmp_path, rng):
    imgs = rng.normal(size=(7, 16, 16)).astype(np.float32)
    p = tmp_path / "s.mrcs"
    write_stack(p, imgs, pixel_size_A=2.5)
    h = read_mrc_header(p)
    assert h["shape"] == (7, 16, 16) and h["mode"] == 2 and h["is_stack"]
    assert h["voxel_size"] == pytest.approx(2.5)
    out, vs = read_mrc(p)
    np.testing.assert_array_equal(out, imgs)
    assert vs == pytest.approx(2.5)


def test_float16_mode12_stack(tmp_path, rng):
    imgs = rng.normal(size=(5, 8, 8)).astype(np.float16)
    p = tmp_path / "h.mrcs"
    with mrcfile.new(p) as m:  # written by mrcfile directly, not by jaxhet
        m.set_data(imgs)
        m.set_image_stack()
        m.voxel_size = 1.1
    assert read_mrc_header(p)["mode"] == 12
    with open_stack(p) as st:
        assert st.shape == (5, 8, 8) and st.dtype == np.float16
        got = st[[4, 0, 2]]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, imgs[[4, 0, 2]].astype(np.float32))
    out, _ = read_mrc(p)
    np.testing.assert_array_equal(out, imgs.astype(np.float32))


def test_stack_writer_float16(tmp_path, rng):
    imgs = rng.normal(size=(6, 8, 8)).astype(np.float32)
    p = tmp_path / "w.mrcs"
    with create_stack(p, 6, 8, pixel_size_A=3.0, dtype=np.float16) as w:
        w[0:4] = imgs[:4]
        w[4] = imgs[4]
        w[5] = imgs[5]
    h = read_mrc_header(p)
    assert h["mode"] == 12 and h["shape"] == (6, 8, 8) and h["voxel_size"] == pytest.approx(3.0)
    out, _ = read_mrc(p)
    np.testing.assert_allclose(out, imgs, atol=4e-3)  # float16 rounding


def test_memmap_indexing(tmp_path, rng):
    imgs = rng.normal(size=(20, 6, 6)).astype(np.float32)
    p = tmp_path / "s.mrcs"
    write_stack(p, imgs, 1.0)
    st = open_stack(p)
    assert st.shape == (20, 6, 6) and len(st) == 20 and st.voxel_size == pytest.approx(1.0)
    np.testing.assert_array_equal(st[3], imgs[3])
    np.testing.assert_array_equal(st[2:9:3], imgs[2:9:3])
    idx = np.array([17, 2, 2, 9, 0, 19])  # unsorted, with a duplicate
    np.testing.assert_array_equal(st[idx], imgs[idx])
    np.testing.assert_array_equal(st[np.arange(5, 12)], imgs[5:12])  # contiguous run
    assert st[np.array([], int)].shape == (0, 6, 6)
    # a read-only map: the file cannot be changed through it
    assert not st._data.flags.writeable
    st.close()


@pytest.mark.parametrize("bad", [20, 25, -1])
def test_index_out_of_range_names_file_index_and_length(tmp_path, bad):
    p = tmp_path / "s.mrcs"
    write_stack(p, np.zeros((20, 4, 4)), 1.0)
    with open_stack(p) as st:
        with pytest.raises(JaxhetInputError, match=rf"s\.mrcs: image index {bad} out of range for a stack of 20 images"):
            st[[0, bad]]
        with pytest.raises(JaxhetInputError, match="s.mrcs"):
            st[bad]


def test_nan_pixels_name_file_and_index(tmp_path, rng):
    imgs = rng.normal(size=(10, 4, 4)).astype(np.float32)
    imgs[6, 1, 2] = np.nan
    imgs[8, 0, 0] = np.inf
    p = tmp_path / "nan.mrcs"
    write_stack(p, imgs, 1.0)
    with open_stack(p) as st:
        np.testing.assert_array_equal(st[[0, 1, 5]], imgs[[0, 1, 5]])  # clean images still read
        with pytest.raises(JaxhetInputError, match=r"nan\.mrcs: image 6 has NaN"):
            st[[9, 6, 1]]
        with pytest.raises(JaxhetInputError, match=r"nan\.mrcs: image 8 has NaN or infinite"):
            st[8]
    with open_stack(p, check_finite=False) as st:
        assert np.isnan(st[6]).any()
    with pytest.raises(JaxhetInputError, match="nan.mrcs"):
        read_mrc(p)


def test_missing_file(tmp_path):
    for fn in (read_mrc, open_stack, read_mrc_header):
        with pytest.raises(JaxhetInputError, match=r"nothere\.mrcs: no such file"):
            fn(tmp_path / "nothere.mrcs")


def test_truncated_and_corrupt_files(tmp_path):
    p = tmp_path / "s.mrcs"
    write_stack(p, np.ones((10, 8, 8)), 1.0)
    raw = p.read_bytes()
    t = tmp_path / "trunc.mrcs"
    t.write_bytes(raw[:-100])
    for fn in (read_mrc, open_stack):
        with pytest.raises(JaxhetInputError, match=r"trunc\.mrcs: truncated or corrupt MRC file"):
            fn(t)
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"\x07" * 2000)
    with pytest.raises(JaxhetInputError, match=r"junk\.mrc: truncated or corrupt"):
        open_stack(junk)
    short = tmp_path / "short.mrc"
    short.write_bytes(b"abc")
    with pytest.raises(JaxhetInputError, match=r"short\.mrc: truncated or corrupt"):
        read_mrc_header(short)
