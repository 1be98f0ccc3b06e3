"""CTF: RELION's formula evaluated by hand (numpy, float64) at hand-picked frequencies,
and physical checks (zeros along the astigmatism axes, CTF(0) = +w, signs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

from jaxhet.core import CTFParams, electron_wavelength_in_angstroms, frequency_grid_2d
import jaxhet.core as core

ctf = jax.jit(core.ctf, static_argnames="sign")


def test_electron_wavelength():
    assert abs(float(electron_wavelength_in_angstroms(300.0)) - 0.019687) < 1e-6
    assert abs(float(electron_wavelength_in_angstroms(200.0)) - 0.025079) < 1e-6
    assert abs(float(electron_wavelength_in_angstroms(100.0)) - 0.037014) < 1e-6


def test_ctf_against_formula_by_hand():
    dU, dV, ang, kv, cs, w, ps, B = 20000.0, 15000.0, 30.0, 300.0, 2.7, 0.07, 20.0, 50.0
    p = CTFParams.create(dU, dV, ang, kv, cs, w, ps, B)
    k = np.array([[0.1, 0.0], [0.0, 0.1], [0.05, 0.05], [0.2, -0.1], [-0.03, 0.17], [0.0, 0.0]])
    # by hand (CONVENTIONS.md), float64
    V = kv * 1e3
    lam = 12.2643247 / np.sqrt(V * (1 + 0.978466e-6 * V))
    expected = []
    for kx, ky in k:
        s2 = kx * kx + ky * ky
        azimuth = np.arctan2(ky, kx)
        defocus = (dU + dV) / 2 + (dU - dV) / 2 * np.cos(2 * (azimuth - np.deg2rad(ang)))
        gamma = (np.pi * lam * defocus * s2 - np.pi / 2 * (cs * 1e7) * lam ** 3 * s2 ** 2
                 + np.arcsin(w) + np.deg2rad(ps))
        expected.append(np.sin(gamma) * np.exp(-B * s2 / 4))
    got = np.asarray(ctf(p, jnp.asarray(k, jnp.float32)))
    # float32 phase of up to ~60 rad: a few ulps of 60
    np.testing.assert_allclose(got, expected, atol=64 * EPS32 * 60)
    # magnitude check: these frequencies are not accidentally all near zero
    assert np.abs(expected).max() > 0.3


def test_ctf_astigmatism_axes_zeros_and_defocus_angle():
    """Without Cs, amplitude contrast and phase shift, CTF = sin(pi lambda defocus k^2): the
    first zero lies at k = 1/sqrt(lambda dU) along the rlnDefocusAngle direction and at
    1/sqrt(lambda dV) perpendicular to it."""
    dU, dV, ang = 20000.0, 12000.0, 35.0
    p = CTFParams.create(dU, dV, ang, 300.0, 0.0, 0.0, 0.0, 0.0)
    lam = float(electron_wavelength_in_angstroms(300.0))
    u = np.array([np.cos(np.deg2rad(ang)), np.sin(np.deg2rad(ang))])
    v = np.array([-u[1], u[0]])
    kU, kV = 1 / np.sqrt(lam * dU), 1 / np.sqrt(lam * dV)
    pts = np.stack([u * kU, v * kV, u * kU * 0.7, u * kU * 1.2, v * kV * 0.7, v * kV * 1.2, -u * kU, -v * kV])
    c = np.asarray(ctf(p, jnp.asarray(pts, jnp.float32)))
    np.testing.assert_allclose(c[[0, 1, 6, 7]], 0.0, atol=1e-4)
    assert c[2] > 0.5 and c[3] < -0.5 and c[4] > 0.5 and c[5] < -0.5
    # the wrong axis assignment would not vanish there
    assert abs(float(ctf(p, jnp.asarray(v * kU, jnp.float32)))) > 0.5


def test_ctf_at_zero_is_amplitude_contrast_and_signs():
    p = CTFParams.create(15000.0, 14000.0, 10.0, 300.0, 2.7, 0.1, 0.0, 0.0)
    k = jnp.asarray(frequency_grid_2d(32, pixel_size=1.5))
    relion = np.asarray(ctf(p, k, sign="relion"))
    drgn = np.asarray(ctf(p, k, sign="cryodrgn"))
    np.testing.assert_allclose(relion[16, 16], 0.1, atol=4 * EPS32)  # CTF(0) = +w
    np.testing.assert_array_equal(drgn, -relion)
    # cryoDRGN's own expression (CONVENTIONS.md): sqrt(1-w^2) sin(g) - w cos(g),
    # g = -pi lambda defocus k^2 + pi/2 Cs lambda^3 k^4 - phase
    kk = np.asarray(k, np.float64)
    s2 = (kk ** 2).sum(-1)
    az = np.arctan2(kk[..., 1], kk[..., 0])
    lam = 12.2643247 / np.sqrt(300e3 * (1 + 0.978466e-6 * 300e3))
    df = 14500.0 + 500.0 * np.cos(2 * (az - np.deg2rad(10.0)))
    g = -np.pi * lam * df * s2 + np.pi / 2 * 2.7e7 * lam ** 3 * s2 ** 2
    np.testing.assert_allclose(drgn, np.sqrt(1 - 0.01) * np.sin(g) - 0.1 * np.cos(g), atol=64 * EPS32 * 30)
    with pytest.raises(ValueError):
        core.ctf(p, k, sign="eman")


def test_phase_shift_b_factor_and_spherical_aberration():
    k = jnp.asarray(frequency_grid_2d(32, pixel_size=2.0))
    s2 = np.asarray((k ** 2).sum(-1))
    # 90 degree phase plate, no amplitude contrast: CTF(0) = 1
    pp = CTFParams.create(5000.0, 5000.0, 0.0, 300.0, 2.7, 0.0, 90.0, 0.0)
    assert abs(float(ctf(pp, jnp.zeros((1, 2)))[0]) - 1.0) < 4 * EPS32
    # B-factor: exactly an envelope exp(-B k^2 / 4)
    p0 = CTFParams.create(15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, 0.0, 0.0)
    pB = p0._replace(b_factor_in_angstroms2=jnp.float32(120.0))
    c0, cB = np.asarray(ctf(p0, k)), np.asarray(ctf(pB, k))
    np.testing.assert_allclose(cB, c0 * np.exp(-120.0 * s2 / 4), atol=16 * EPS32)
    # in focus, no amplitude contrast: CTF = -sin(pi/2 Cs lambda^3 k^4) (negative at low k)
    pf = CTFParams.create(0.0, 0.0, 0.0, 300.0, 2.7, 0.0, 0.0, 0.0)
    lam = 12.2643247 / np.sqrt(300e3 * (1 + 0.978466e-6 * 300e3))
    np.testing.assert_allclose(np.asarray(ctf(pf, k)), -np.sin(np.pi / 2 * 2.7e7 * lam ** 3 * s2 ** 2), atol=16 * EPS32)


def test_ctf_batched_with_vmap():
    rng = np.random.default_rng(0)
    n = 4
    p = CTFParams.create(rng.uniform(1e4, 2e4, n), rng.uniform(1e4, 2e4, n), rng.uniform(0, 180, n))
    assert p.defocus_u_in_angstroms.shape == (n,) and p.voltage_in_kilovolts.shape == (n,)
    k = jnp.asarray(frequency_grid_2d(16, pixel_size=2.0))
    batch = jax.vmap(lambda q: core.ctf(q, k))(p)
    for i in range(n):
        one = ctf(jax.tree_util.tree_map(lambda x: x[i], p), k)
        # both are float32 evaluations of a phase of up to ~100 rad, fused differently
        np.testing.assert_allclose(np.asarray(batch[i]), np.asarray(one), atol=16 * EPS32 * 100)
