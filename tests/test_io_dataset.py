"""ParticleDataset: batches equal direct reads, Fourier downsampling, prefetch, bad input."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from jaxhet._errors import JaxhetInputError
from jaxhet.io import (ParticleDataset, ParticleTable, fourier_downsample, open_stack,
                       write_stack)


def _dataset_files(tmp_path, rng, n_stacks=3, per=7, box=32, pixel=1.5):
    stacks, all_imgs = [], []
    for s in range(n_stacks):
        imgs = rng.normal(size=(per, box, box)).astype(np.float32)
        p = tmp_path / f"s{s}.mrcs"
        write_stack(p, imgs, pixel)
        stacks.append(str(p))
        all_imgs.append(imgs)
    # particles interleave the stacks and visit their images out of order
    n = n_stacks * per
    order = rng.permutation(n)
    paths = [stacks[i % n_stacks] for i in order]
    idx = [(i // n_stacks) for i in order]
    expected = np.stack([all_imgs[i % n_stacks][i // n_stacks] for i in order])
    euler = rng.uniform(-180, 180, (n, 3))
    t = ParticleTable.create(paths, idx, euler_in_degrees=euler, origin_in_pixels=rng.uniform(-3, 3, (n, 2)),
                             defocus_u_in_angstroms=rng.uniform(1e4, 2e4, n), pixel_size_in_angstroms=pixel,
                             box_size=box)
    return t, expected


def test_batches_equal_direct_reads(tmp_path, rng):
    t, expected = _dataset_files(tmp_path, rng)
    ds = ParticleDataset(t, max_open_files=2)
    seen = []
    for b in ds.batches(5):
        assert b.images.dtype == np.float32 and b.images.shape[1:] == (32, 32)
        np.testing.assert_array_equal(b.images, expected[b.indices])
        # and the same as reading the stack files one image at a time
        for k, i in enumerate(b.indices):
            with open_stack(t.stack_paths[i]) as st:
                np.testing.assert_array_equal(b.images[k], st[int(t.stack_indices[i])])
        np.testing.assert_array_equal(b.rotations, t.rotation_matrices()[b.indices])
        assert b.rotations.dtype == np.float32 and b.origin_in_pixels.dtype == np.float32
        np.testing.assert_allclose(b.origin_in_pixels, t.origin_in_pixels[b.indices], rtol=1e-6)
        np.testing.assert_array_equal(b.ctf.defocus_u_in_angstroms, t.defocus_u_in_angstroms[b.indices].astype(np.float32))
        assert b.ctf.voltage_in_kilovolts.shape == (len(b.indices),)
        assert b.pixel_size_in_angstroms == 1.5
        seen.append(b.indices)
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(seen, np.arange(len(t)))
    assert [len(s) for s in np.split(seen, [5, 10, 15, 20])] == [5, 5, 5, 5, 1]
    assert len(ds._open) <= 2
    ds.close()


def test_shuffle_indices_drop_last(tmp_path, rng):
    t, expected = _dataset_files(tmp_path, rng)
    ds = ParticleDataset(t)
    a = np.concatenate([b.indices for b in ds.batches(4, shuffle=True, seed=3)])
    b = np.concatenate([b.indices for b in ds.batches(4, shuffle=True, seed=3)])
    c = np.concatenate([b.indices for b in ds.batches(4, shuffle=True, seed=4)])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and sorted(a) == list(range(len(t)))
    sel = np.array([20, 3, 3, 11, 7])
    got = list(ds.batches(2, indices=sel, drop_last=True))
    assert [len(g.indices) for g in got] == [2, 2]
    np.testing.assert_array_equal(np.concatenate([g.images for g in got]), expected[sel[:4]])
    no_prefetch = ParticleDataset(t, prefetch=0)
    for x, y in zip(no_prefetch.batches(6), ds.batches(6)):
        np.testing.assert_array_equal(x.images, y.images)


def _band_limited(box, freqs, coords):
    """sum of cosines with frequencies (cycles per ORIGINAL box) at pixel coords (y, x)
    measured in original pixels from the box centre."""
    y, x = coords
    img = np.zeros(np.broadcast(y, x).shape)
    for (ky, kx, amp, ph) in freqs:
        img += amp * np.cos(2 * np.pi * (ky * y + kx * x) / box + ph)
    return img


def test_fourier_downsample_matches_analytic_band_limited_image():
    D, Dn = 64, 24
    freqs = [(0, 0, 1.3, 0.0), (3, -2, 0.7, 0.4), (-5, 7, 0.5, 1.1), (11, 4, 0.3, -0.6), (-2, -11, 0.2, 2.0)]
    # all |k| < Dn/2 = 12: exactly representable on the coarse grid
    c = np.arange(D) - D // 2
    img = _band_limited(D, freqs, np.meshgrid(c, c, indexing="ij"))
    cn = (np.arange(Dn) - Dn // 2) * (D / Dn)  # new pixel centres, centre pixel Dn//2 at D//2
    expected = _band_limited(D, freqs, np.meshgrid(cn, cn, indexing="ij"))
    got = fourier_downsample(img[None].astype(np.float32), Dn)[0]
    assert got.shape == (Dn, Dn)
    # mass is kept: the coarse pixels hold (D/D')^2 fine pixels' worth of the same image
    np.testing.assert_allclose(got, expected * (D / Dn) ** 2, atol=2e-5 * (D / Dn) ** 2)
    # a constant image keeps its sum (and its DFT values), as core.downsample_2d
    np.testing.assert_allclose(fourier_downsample(np.full((2, 33, 33), 4.0), 10), 4.0 * (33 / 10) ** 2, rtol=1e-6)
    from jaxhet.core import downsample_2d
    np.testing.assert_allclose(got, np.asarray(downsample_2d(img.astype(np.float32), Dn)), rtol=1e-4, atol=1e-3)
    # odd original box
    D2 = 45
    c2 = np.arange(D2) - D2 // 2
    img2 = _band_limited(D2, freqs[:3], np.meshgrid(c2, c2, indexing="ij"))
    cn2 = (np.arange(16) - 8) * (D2 / 16)
    np.testing.assert_allclose(fourier_downsample(img2, 16),
                               _band_limited(D2, freqs[:3], np.meshgrid(cn2, cn2, indexing="ij")) * (D2 / 16) ** 2,
                               atol=2e-5 * (D2 / 16) ** 2)
    with pytest.raises(JaxhetInputError, match="must be even"):
        fourier_downsample(img, 25)


def test_dataset_downsampling_scales_pixels_and_origins(tmp_path, rng):
    D, Dn = 48, 16
    freqs = [(0, 0, 1.0, 0.0), (2, 5, 0.6, 0.3), (-6, 1, 0.4, -1.0)]
    c = np.arange(D) - D // 2
    img = _band_limited(D, freqs, np.meshgrid(c, c, indexing="ij")).astype(np.float32)
    write_stack(tmp_path / "b.mrcs", np.stack([img, 2 * img]), 2.0)
    t = ParticleTable.create(str(tmp_path / "b.mrcs"), [0, 1], euler_in_degrees=np.zeros((2, 3)),
                             origin_in_pixels=[[3.0, -6.0], [0.0, 1.5]], defocus_u_in_angstroms=1e4,
                             pixel_size_in_angstroms=2.0, box_size=D)
    ds = ParticleDataset(t, downsample_to=Dn)
    assert ds.image_size == Dn and ds.pixel_size_in_angstroms == pytest.approx(6.0)
    (b,) = list(ds.batches(8))
    cn = (np.arange(Dn) - Dn // 2) * (D / Dn)
    expected = _band_limited(D, freqs, np.meshgrid(cn, cn, indexing="ij")) * (D / Dn) ** 2  # mass per pixel
    np.testing.assert_allclose(b.images[0], expected, atol=2e-4)
    np.testing.assert_allclose(b.images[1], 2 * expected, atol=4e-4)
    np.testing.assert_allclose(b.origin_in_pixels, [[1.0, -2.0], [0.0, 0.5]])
    assert b.pixel_size_in_angstroms == pytest.approx(6.0)
    for bad in (15, 50, 0):
        with pytest.raises(JaxhetInputError, match="downsample_to"):
            ParticleDataset(t, downsample_to=bad)


def test_bad_inputs_name_the_file(tmp_path, rng):
    t, _ = _dataset_files(tmp_path, rng, n_stacks=1, per=4, box=16)
    # index past the end of the stack
    bad = t.copy()
    bad.stack_indices[2] = 9
    with pytest.raises(JaxhetInputError, match=r"s0\.mrcs: image index 9 out of range for a stack of 4 images"):
        list(ParticleDataset(bad).batches(4))
    # missing stack file
    gone = t.copy()
    gone.stack_paths[1] = str(tmp_path / "gone.mrcs")
    with pytest.raises(JaxhetInputError, match=r"gone\.mrcs: no such file"):
        list(ParticleDataset(gone).batches(2))
    # NaN pixels
    imgs = rng.normal(size=(4, 16, 16)).astype(np.float32)
    imgs[2, 3, 3] = np.nan
    write_stack(tmp_path / "nan.mrcs", imgs, 1.5)
    nan = ParticleTable.create(str(tmp_path / "nan.mrcs"), np.arange(4), defocus_u_in_angstroms=1e4,
                               pixel_size_in_angstroms=1.5, box_size=16)
    it = ParticleDataset(nan).batches(2)
    next(it)  # images 0, 1 are fine
    with pytest.raises(JaxhetInputError, match=r"nan\.mrcs: image 2 has NaN"):
        next(it)
    # box in the metadata disagrees with the stack
    wrong = t.copy()
    wrong.box_size[:] = 20
    with pytest.raises(JaxhetInputError, match=r"s0\.mrcs: images are 16x16 but .* says box 20"):
        list(ParticleDataset(wrong).batches(2))
    # inconsistent pixel size / box across particles
    mixed = t.copy()
    mixed.filename = "mixed.star"
    mixed.pixel_size_in_angstroms[0] = 1.0
    with pytest.raises(JaxhetInputError, match=r"mixed\.star: particles have different pixel sizes"):
        ParticleDataset(mixed)
    mixed = t.copy()
    mixed.filename = "mixed.star"
    mixed.box_size[0] = 64
    with pytest.raises(JaxhetInputError, match=r"mixed\.star: particles have different box sizes"):
        ParticleDataset(mixed)


def test_abandoned_iteration_stops_the_prefetch_thread(tmp_path, rng):
    t, _ = _dataset_files(tmp_path, rng, n_stacks=2, per=30, box=16)
    ds = ParticleDataset(t, prefetch=2)
    before = threading.active_count()
    it = ds.batches(2)
    next(it)
    it.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_reading_does_not_load_whole_stacks(tmp_path, rng):
    """A batch reads only its images: a large stack is never copied into memory."""
    n, box = 400, 64
    with open(tmp_path / "big.mrcs", "wb"):
        pass
    from jaxhet.io import create_stack
    with create_stack(tmp_path / "big.mrcs", n, box, 1.0, overwrite=True) as w:
        for a in range(0, n, 100):
            w[a:a + 100] = rng.normal(size=(100, box, box)).astype(np.float32)
    t = ParticleTable.create(str(tmp_path / "big.mrcs"), np.arange(n), defocus_u_in_angstroms=1e4,
                             pixel_size_in_angstroms=1.0, box_size=box)
    ds = ParticleDataset(t)
    import tracemalloc
    tracemalloc.start()
    for b in ds.batches(8, shuffle=True):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = n * box * box * 4
    assert peak < whole / 4, (peak, whole)
