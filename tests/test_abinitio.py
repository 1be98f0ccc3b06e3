"""Ab initio (minibatch stochastic EM) and map alignment (rotation, translation, hand)."""

import numpy as np
import jax.numpy as jnp
import pytest

from jaxhet.analysis import (align_maps, fsc, map_fsc_auc, mirror_volume, per_image_fsc_auc, per_state_fsc_auc,
                             rotate_volume, translate_volume)
from jaxhet.core import euler_to_matrix
from jaxhet.inference import ArrayDataset, abinitio_sgd
from jaxhet.sim import SimulationParams, ground_truth_map, load_structure, simulate_images

D = 24
PIX = 4.0


@pytest.fixture(scope="module")
def gt():
    return ground_truth_map(load_structure("adk-closed"), 0, D, PIX, 3.0)


def test_mirror_rotate_translate_identities(gt):
    np.testing.assert_array_equal(mirror_volume(mirror_volume(gt)), gt)
    c = D // 2
    m = mirror_volume(gt)
    np.testing.assert_allclose(m[c + 3, 5, 7], gt[c - 3, 5, 7])
    np.testing.assert_allclose(rotate_volume(gt, np.eye(3)), gt, atol=1e-6 * gt.max())
    Q = np.asarray(euler_to_matrix(jnp.array([30.0, 50.0, 70.0])))
    back = rotate_volume(rotate_volume(gt, Q), Q.T)
    assert fsc(back, gt).min() > 0.95
    # sub-pixel round trip: exact except the Nyquist planes (their phase is not representable)
    tt = translate_volume(translate_volume(gt, [1.5, -2.0, 0.5]), [-1.5, 2.0, -0.5])
    assert fsc(tt, gt)[:-1].min() > 0.9999
    np.testing.assert_allclose(tt, gt, atol=1e-2 * gt.max())
    # an integer translation moves the content by +s (x is the last axis)
    t = translate_volume(gt, [2, 0, 0])
    np.testing.assert_allclose(t[:, :, 2:], gt[:, :, :-2], atol=1e-3 * gt.max())


def test_align_maps_recovers_rotation_shift_and_hand(gt):
    Q = np.asarray(euler_to_matrix(jnp.array([37.0, 71.0, -122.0])))
    moved = translate_volume(rotate_volume(mirror_volume(gt), Q), [1.0, -2.0, 1.0])
    assert map_fsc_auc(moved, gt, normalized=True) < 0.5
    r = align_maps(moved, gt, PIX, search_box=D)
    assert r.mirrored
    # perfect: 0.917 at D=24; measured 0.90 (two trilinear resamplings)
    assert map_fsc_auc(r.aligned, gt, normalized=True) > 0.85
    r2 = align_maps(translate_volume(rotate_volume(gt, Q), [1.0, 0.0, 0.0]), gt, PIX, search_box=D)
    assert not r2.mirrored and map_fsc_auc(r2.aligned, gt, normalized=True) > 0.85


def test_per_state_and_per_image_fsc_auc(gt):
    rng = np.random.default_rng(0)
    noisy = gt + rng.normal(scale=gt.std(), size=gt.shape).astype(np.float32)
    s = per_state_fsc_auc([gt, noisy], [gt, gt], normalized=True)
    assert s[0] == pytest.approx(map_fsc_auc(gt, gt, normalized=True)) and s[1] < s[0]
    maps = [gt, noisy]
    v = per_image_fsc_auc(lambda i: maps[i % 2], labels=[0, 0, 0, 0], ground_truth_maps=[gt])
    np.testing.assert_allclose(v, [s[0] / 2, s[1] / 2] * 2, rtol=1e-6)  # raw scale = normalized / 2
    with pytest.raises(ValueError):
        per_state_fsc_auc([gt], [gt, gt])


def test_abinitio_sgd_finds_the_structure(gt):
    """High-SNR D=24 images, unknown poses: the minibatch phase recovers the low-resolution map."""
    st = load_structure("adk-closed")
    p = SimulationParams(n_images=400, box_size=D, pixel_size=PIX, snr=5.0, seed=1, atom_sigma_in_angstroms=3.0)
    imgs, meta, _ = simulate_images(st, p)
    ds = ArrayDataset(imgs, meta.ctf, PIX)
    vol, hist = abinitio_sgd(ds, n_iterations=12, minibatch_size=100, initial_resolution_in_angstroms=32.0,
                             final_resolution_in_angstroms=16.0, fine_from_resolution_in_angstroms=10.0, seed=0)
    assert len(hist) == 12 and vol.shape == (D, D, D)
    al = align_maps(vol, gt, PIX, search_box=D)
    c = fsc(al.aligned, gt)
    # the map is right to ~16 A (shell 6 at D=24, 4 A/px): measured FSC 0.9x below that
    assert c[1:5].min() > 0.8, c
    # the random-orientation start (no iteration) is a blob: clearly worse
    v0, h0 = abinitio_sgd(ds, n_iterations=0, minibatch_size=100, initial_resolution_in_angstroms=32.0, seed=0)
    assert h0 == []
    c0 = fsc(align_maps(v0, gt, PIX, search_box=D).aligned, gt)
    assert c[2:5].mean() > c0[2:5].mean() + 0.1, (c, c0)
