"""Known-pose reconstruction: adjoint identity, ground truth recovery, Wiener limits, streaming."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxhet.core import (CTFParams, euler_to_matrix, gaussian_atoms_volume, gather_trilinear, prepare_volume,
                         project_volume, random_rotations, render_fourier, render_image, matrix_to_euler)
from jaxhet.inference import (accumulate_batches, array_batches, backproject_images, finalize_reconstruction,
                              frequency_set, init_reconstruction, random_half, reconstruct, snr_from_fsc,
                              soft_mask_outside_map, symmetrized_grids, wiener_filter)
from jaxhet.analysis import fsc, map_fsc_auc, solvent_mask, lowpass_filter
from jaxhet.sim import load_structure, ground_truth_map, render_clean_images

D = 32
PIX = 3.0


@pytest.fixture(scope="module")
def adk_data():
    """Noise-free CTF'd, shifted AdK projections at D=32 (the same core as jaxhet.sim)."""
    st = load_structure("adk-closed")
    gt = ground_truth_map(st, 0, D, PIX)
    rng = np.random.default_rng(0)
    n = 1500
    R = np.asarray(random_rotations(jax.random.PRNGKey(0), n))
    eul = np.asarray(matrix_to_euler(jnp.asarray(R)))
    origin = rng.uniform(-3, 3, (n, 2)).astype(np.float32)
    du = rng.uniform(8000, 20000, n).astype(np.float32)
    ctf = CTFParams(*[np.asarray(x) for x in CTFParams.create(du, du - 200.0, rng.uniform(0, 180, n))])
    imgs = render_clean_images(gt, eul, origin, ctf, PIX)
    return gt, imgs, np.asarray(euler_to_matrix(jnp.asarray(eul))), origin, ctf


def test_noise_free_reconstruction_matches_ground_truth(adk_data):
    gt, imgs, R, origin, ctf = adk_data
    res = reconstruct(array_batches(imgs, R, origin, ctf, PIX, 256), batch_size=256)
    auc = map_fsc_auc(res.volume, gt, normalized=True)
    # a perfect map scores (D/2 - 1)/(D/2) = 0.9375 on this CryoBench scale (x stops one shell
    # before Nyquist); measured 0.9364 (FSC > 0.98 in every shell)
    assert auc > 0.93, auc
    assert fsc(res.volume, gt).min() > 0.98  # measured 0.988 (last shell)
    # mass-per-voxel normalisation: the map has the ground truth's scale
    scale = float((res.volume * gt).sum() / (gt * gt).sum())
    assert 0.95 < scale < 1.05, scale
    assert np.allclose(res.n_images, [len(imgs) / 2] * 2, atol=1)
    assert res.resolution_0143 == pytest.approx(2 * PIX, rel=0.05)  # noise free: Nyquist


def test_wrong_shift_sign_is_detected(adk_data):
    gt, imgs, R, origin, ctf = adk_data
    res = reconstruct(array_batches(imgs, R, -origin, ctf, PIX, 256), batch_size=256)
    assert map_fsc_auc(res.volume, gt, normalized=True) < 0.6


def test_batch_size_does_not_change_result(adk_data):
    gt, imgs, R, origin, ctf = adk_data
    sub = slice(0, 200)
    sub_ctf = CTFParams(*[x[sub] for x in ctf])
    s1, _ = accumulate_batches(init_reconstruction(D), array_batches(imgs[sub], R[sub], origin[sub], sub_ctf, PIX, 7),
                               batch_size=7)
    s2, _ = accumulate_batches(init_reconstruction(D), array_batches(imgs[sub], R[sub], origin[sub], sub_ctf, PIX, 200),
                               batch_size=64)
    np.testing.assert_allclose(np.asarray(s1.weight), np.asarray(s2.weight), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s1.numerator), np.asarray(s2.numerator), rtol=1e-3, atol=1e-2)


def test_backprojection_is_adjoint_of_forward_model():
    """Re <X, N> = D^2 sum_i <render_i(X), y_i>: N is the adjoint of the CTF'd, shifted slicing."""
    Dm, pf, pix = 16, 2, 2.0
    P = Dm * pf
    key = jax.random.PRNGKey(3)
    k1, k2, k3 = jax.random.split(key, 3)
    x_real = jax.random.normal(k1, (P, P, P))  # Hermitian spectrum: the FT of a real grid
    from jaxhet.core import fft3_centered
    X = fft3_centered(x_real)
    n = 5
    R = random_rotations(k2, n)
    ys = jax.random.normal(k3, (n, Dm, Dm))
    shifts = jnp.array([[0.5, -1.0], [0.0, 0.0], [2.0, 1.5], [-0.3, 0.7], [1.0, -2.0]])
    ctf = CTFParams.create(jnp.array([9000.0, 12000.0, 15000.0, 18000.0, 21000.0]))
    st = backproject_images(init_reconstruction(Dm, pf), ys, R, shifts, ctf, jnp.zeros(n, jnp.int32), pix)
    N, _ = symmetrized_grids(st)
    lhs = float(jnp.real(jnp.vdot(X, N[0])))
    # forward model with the same band limit (|k| <= D/2), via the core's render_fourier
    fs = frequency_set(Dm)
    band = np.zeros(Dm * (Dm // 2 + 1), np.float32)
    band[fs.flat_index] = 1.0
    band = jnp.asarray(band.reshape(Dm, Dm // 2 + 1))
    fn = lambda k: gather_trilinear(X, k * (P * pix))  # noqa: E731  map DFT at k in 1/A
    rhs = 0.0
    for i in range(n):
        c = CTFParams(*[f[i] for f in ctf])
        model = render_fourier(fn, R[i], shifts[i], c, Dm, pix) * band
        rhs += float(jnp.sum(render_image(model, Dm) * ys[i])) * Dm * Dm
    assert lhs == pytest.approx(rhs, rel=1e-4)


def test_gridding_correction_restores_off_centre_density():
    """Three blobs 12-13 px from the centre of a D=32 box: amplitudes within 3% (9-15% low without)."""
    pos = jnp.array([[0.0, 0.0, 0.0], [24.0, 0.0, 0.0], [0.0, -20.0, 18.0], [-26.0, 0.0, 0.0]])
    vol = gaussian_atoms_volume(pos, jnp.ones(4), jnp.full(4, 2.0), D, 2.0)
    vft = prepare_volume(vol)
    n = 2000
    R = random_rotations(jax.random.PRNGKey(1), n)
    imgs = jax.jit(jax.vmap(lambda A: render_image(project_volume(vft, A, None, None, 2.0), D)))(R)
    st, _ = accumulate_batches(init_reconstruction(D),
                               array_batches(np.asarray(imgs), np.asarray(R), np.zeros((n, 2)), None, 2.0, 500),
                               batch_size=500)
    c = D // 2
    peaks = [(c, c, c + 12), (c + 9, c - 10, c), (c, c, c - 13)]
    v = finalize_reconstruction(st, 2.0, wiener="none", gridding_correction=True).volume
    ratios = [v[p] / vol[p] for p in peaks]
    assert all(0.97 < r < 1.03 for r in ratios), ratios
    v0 = finalize_reconstruction(st, 2.0, wiener="none", gridding_correction=False).volume
    assert all(v0[p] / vol[p] < 0.93 for p in peaks)


def test_wiener_filter_limits(adk_data):
    gt, imgs, R, origin, ctf = adk_data
    st, _ = accumulate_batches(init_reconstruction(D), array_batches(imgs[:300], R[:300], origin[:300],
                                                                     CTFParams(*[x[:300] for x in ctf]), PIX, 300),
                               batch_size=300)
    none = finalize_reconstruction(st, PIX, wiener="none")
    big = finalize_reconstruction(st, PIX, snr=np.full(D // 2, 1e9))
    np.testing.assert_allclose(big.volume, none.volume, atol=1e-6 * np.abs(none.volume).max())
    tiny = finalize_reconstruction(st, PIX, snr=np.full(D // 2, 1e-9))
    assert np.abs(tiny.volume).max() < 1e-6 * np.abs(none.volume).max()
    for kind in ("shell", "voxel"):
        mid = finalize_reconstruction(st, PIX, wiener=kind, snr=np.full(D // 2, 1.0))
        # shell form: each shell of the full map scaled by 2/3 (SNR_full = 2); voxel form: between
        ratio = float((mid.volume * none.volume).sum() / (none.volume ** 2).sum())
        if kind == "shell":
            assert ratio == pytest.approx(2.0 / 3.0, rel=1e-3)
        else:
            assert 0.3 < ratio < 0.95
    # shell gain leaves the FSC unchanged
    np.testing.assert_allclose(big.fsc_unmasked, finalize_reconstruction(st, PIX).fsc_unmasked, atol=1e-4)


def test_wiener_filter_gain_and_snr_from_fsc():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(16, 16, 16))
    s = np.full(8, 3.0)
    np.testing.assert_allclose(wiener_filter(v, s), 0.75 * v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(snr_from_fsc([0.5, 0.0, 1.0, 0.75]), [1.0, 0.001 / 0.999, 999.0, 3.0], rtol=1e-6)


def test_random_half_is_balanced_and_deterministic():
    idx = np.arange(10001)
    h = random_half(idx, 0)
    assert set(np.unique(h)) == {0, 1}
    assert abs(int(h.sum()) - 5000) <= 1
    assert np.all(h[0::2][:5000] != h[1::2][:5000])  # pairs split
    np.testing.assert_array_equal(h, random_half(idx, 0))
    assert np.mean(random_half(idx, 1) != h) > 0.3  # another seed, another split
    # random, not alternating
    assert 0.3 < np.mean(h[0::2]) < 0.7


def test_solvent_mask_and_lowpass(adk_data):
    gt = adk_data[0]
    m = solvent_mask(gt, PIX, lowpass_in_angstroms=15.0, extend_in_pixels=2, soft_edge_in_pixels=4)
    assert m.min() >= 0 and m.max() <= 1
    assert m[D // 2, D // 2, D // 2] == 1.0
    assert m[0, 0, 0] == 0.0
    assert np.sum(gt * m) / np.sum(gt) > 0.99  # the particle is inside
    soft = (m > 0) & (m < 1)
    assert soft.sum() > 0
    # a low-pass keeps the mean (DC) and removes high frequencies
    lp = lowpass_filter(gt, PIX, 15.0)
    assert lp.sum() == pytest.approx(gt.sum(), rel=1e-4)
    assert fsc(lp, gt)[2] > 0.99
    F = np.abs(np.fft.fftn(lp)) / np.abs(np.fft.fftn(gt)).max()
    k = np.fft.fftfreq(D) * D
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    assert F[r > D * PIX / 15.0 + 1.5].max() < 1e-5


def test_soft_mask_outside_map_relion():
    """RELION softMaskOutsideMap: inside kept, outside = weighted mean of the outside, cosine blend."""
    rng = np.random.default_rng(1)
    v = rng.normal(size=(16, 16, 16)).astype(np.float32) + 2.0
    out = soft_mask_outside_map(v, radius=5.0, cosine_width=2.0)
    f = np.arange(16) - 8
    r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    np.testing.assert_array_equal(out[r < 5.0], v[r < 5.0])
    b = np.where(r < 5, 0.0, np.where(r > 7, 1.0, 0.5 + 0.5 * np.cos(np.pi * (7 - r) / 2.0)))
    bg = (b * v).sum() / b.sum()
    np.testing.assert_allclose(out[r > 7.0], bg, rtol=1e-5)
    e = (r > 5.5) & (r < 6.5)
    np.testing.assert_allclose(out[e], ((1 - b) * v + b * bg)[e], rtol=1e-5)
    # a constant map is unchanged; batched maps are masked one by one
    np.testing.assert_allclose(soft_mask_outside_map(np.full((8, 8, 8), 3.0)), 3.0, rtol=1e-6)
    two = soft_mask_outside_map(np.stack([v, 2 * v]), 5.0, 2.0)
    np.testing.assert_allclose(two[1], 2 * out, rtol=1e-5)


def test_outer_mask_flattens_the_corners(adk_data):
    """Default reconstruction: the box corners hold one value (the outer mean); without the mask they are noise."""
    gt, imgs, R, origin, ctf = adk_data
    rng = np.random.default_rng(3)
    noisy = imgs[:300] + rng.normal(0, 0.3 * imgs[:300].std(), imgs[:300].shape).astype(np.float32)
    st, _ = accumulate_batches(init_reconstruction(D), array_batches(noisy, R[:300], origin[:300],
                                                                     CTFParams(*[x[:300] for x in ctf]), PIX, 300),
                               batch_size=300)
    snr = np.linspace(20.0, 0.5, D // 2)  # the same filter for both
    on = finalize_reconstruction(st, PIX, snr=snr)
    off = finalize_reconstruction(st, PIX, snr=snr, outer_mask=False)
    f = np.arange(D) - D // 2
    r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    corner = r > D / 2 + 3
    assert np.ptp(on.volume[corner]) < 1e-5 * np.abs(on.volume).max()
    assert np.ptp(off.volume[corner]) > 1e-2 * np.abs(off.volume).max()
    inside = r < D / 2
    np.testing.assert_allclose(on.volume[inside], off.volume[inside], atol=1e-5 * np.abs(off.volume).max())
    assert np.ptp(on.half_maps[0][corner]) < 1e-5 * np.abs(on.half_maps[0]).max()


def test_leave_out_map_is_the_reconstruction_without_the_fold(adk_data):
    """Fold accumulators minus one fold == accumulating only the other folds (an independent
    route through finalize_reconstruction with the same SNR), and merge_folds == 2 halves."""
    from jaxhet.inference import leave_out_map, merge_folds
    gt, imgs, R, origin, ctf = adk_data
    n, K = 300, 3
    rng = np.random.default_rng(1)
    noisy = imgs[:n] + 0.5 * imgs[:n].std() * rng.normal(size=imgs[:n].shape).astype(np.float32)
    c = CTFParams(*[jnp.asarray(x[:n]) for x in ctf])
    group = rng.integers(0, 2 * K, n).astype(np.int32)
    st = backproject_images(init_reconstruction(D, n_groups=2 * K), jnp.asarray(noisy), jnp.asarray(R[:n]),
                            -jnp.asarray(origin[:n]), c, jnp.asarray(group), PIX)
    snr = np.linspace(20.0, 0.5, D // 2)
    g = K + 1  # second fold of half 1
    loo = leave_out_map(st, g, K, snr, PIX)
    keep = (group // K == 1) & (group != g)
    ck = CTFParams(*[x[keep] for x in c])
    ref_state = backproject_images(init_reconstruction(D), jnp.asarray(noisy[keep]), jnp.asarray(R[:n][keep]),
                                   -jnp.asarray(origin[:n][keep]), ck, jnp.zeros(int(keep.sum()), jnp.int32), PIX)
    ref = finalize_reconstruction(ref_state, PIX, snr=snr * (K - 1) / K).half_maps[0]
    scale = np.abs(ref).max()
    np.testing.assert_allclose(loo / scale, ref / scale, atol=2e-4)
    # it differs from the half map that contains the fold
    halves = merge_folds(st, K)
    full_half = finalize_reconstruction(halves, PIX, snr=snr).half_maps[1]
    assert np.abs(full_half - ref).max() / scale > 0.05
    # merge_folds: the same accumulators as inserting with the half index directly
    st2 = backproject_images(init_reconstruction(D), jnp.asarray(noisy), jnp.asarray(R[:n]), -jnp.asarray(origin[:n]),
                             c, jnp.asarray(group // K), PIX)
    np.testing.assert_allclose(np.asarray(halves.weight), np.asarray(st2.weight), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(halves.count), [np.sum(group < K), np.sum(group >= K)])
    with pytest.raises(ValueError):
        merge_folds(st, 2)
