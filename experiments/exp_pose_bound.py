"""Cramer-Rao bound of each image's orientation under the exact forward model (issue 3).

For image i with true pose (A_i, s_i), CTF c_i and white noise of known per-pixel standard
deviation sigma, the model image is ``f_i(theta) = project(V, A_i exp([w]_x), s_i + t)`` with
theta = (w [3], axis-angle in radians, composed on the right as in the local pose search;
t [2], pixels) and V the ground-truth map (``jaxhet.core.project_volume`` of the prepared
map, i.e. the same differentiable renderer the refinement uses). With Gaussian noise the
Fisher information is

    I_i = J_i^T J_i / sigma^2,     J_i = d f_i / d theta  [D*D, 5] at theta = 0

(``jax.jacfwd`` of the real-space image), and any unbiased estimator has covariance
>= I_i^{-1}. The rotational 3x3 block C_i of I_i^{-1} (shifts marginalised: unknown shifts
cost orientation information) gives the RMS angular error ``sqrt(trace C_i)`` (the rotation
angle of exp([w]) is |w|) and the distribution of the error ``|w|``, w ~ N(0, C_i): its
median over images and draws is what an efficient estimator would reach, to compare with
the refinement's median error. The bound is local (it ignores ambiguities such as near
symmetric views), and uses the ground-truth map and all frequencies to Nyquist: a refinement
with an estimated map and a band-limited comparison sees less information.

Model check: the residual ``y_i - f_i(0)`` must be white noise of variance sigma^2 (the
simulator's noise), which validates the renderer, the normalisation and sigma.

    python experiments/exp_pose_bound.py [--n-images 500]

Data: experiments/out/reconstruct_adk/sim (SNR 0.1, the issue's data) and, when present,
experiments/out/refine_adk_snr1_n5000/sim (same settings at SNR 1). Results:
experiments/results/pose_bound.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMS = {"snr0.1": os.path.join(ROOT, "experiments", "out", "reconstruct_adk", "sim"),
        "snr1": os.path.join(ROOT, "experiments", "out", "refine_adk_snr1_n5000", "sim")}
RESULTS = os.path.join(ROOT, "experiments", "results", "pose_bound.json")


def pose_fisher(vft, images, rotations, shifts, ctf_params, pixel_size, sigma):
    """Per-image Fisher information [B, 5, 5] of (axis-angle [rad], shift [px]) and residual variance [B]."""
    import jax
    import jax.numpy as jnp
    from jaxhet.core import axis_angle_to_matrix, project_volume, render_image

    D = images.shape[-1]

    def model(theta, A, s, c):
        R = A @ axis_angle_to_matrix(theta[:3])
        return render_image(project_volume(vft, R, s + theta[3:], c, pixel_size, D), D).reshape(-1)

    def one(y, A, s, c):
        th0 = jnp.zeros(5, jnp.float32)
        J = jax.jacfwd(model)(th0, A, s, c)  # [D*D, 5]
        r = y.reshape(-1) - model(th0, A, s, c)
        return J.T @ J / sigma ** 2, jnp.mean(r ** 2)

    return jax.jit(jax.vmap(one))(jnp.asarray(images), jnp.asarray(rotations), jnp.asarray(shifts), ctf_params)


def bound_for(sim_dir, n_images, batch, rng):
    import jax.numpy as jnp
    from jaxhet.core import prepare_volume
    from jaxhet.io import ParticleDataset, read_mrc, read_particles

    cfg = json.load(open(os.path.join(sim_dir, "sim_config.json")))
    sigma = float(cfg["noise_sigma"])
    table = read_particles(os.path.join(sim_dir, "particles.mrcs"), poses=os.path.join(sim_dir, "poses.pkl"),
                           ctf=os.path.join(sim_dir, "ctf.pkl"))
    ds = ParticleDataset(table)
    gt, _ = read_mrc(os.path.join(sim_dir, "gt", "frame_000.mrc"))
    vft = prepare_volume(jnp.asarray(gt, jnp.float32))
    R = table.rotation_matrices().astype(np.float32)
    n = min(n_images, len(ds))
    fis, resv = [], []
    t0 = time.time()
    for a in range(0, n, batch):
        rows = np.arange(a, min(n, a + batch))
        b = ds.get_batch(rows)
        F, rv = pose_fisher(vft, b.images, R[rows], -np.asarray(b.origin_in_pixels, np.float32), b.ctf,
                            float(ds.pixel_size_in_angstroms), sigma)
        fis.append(np.asarray(F, np.float64))
        resv.append(np.asarray(rv, np.float64))
    F = np.concatenate(fis)
    resv = np.concatenate(resv)
    cov = np.linalg.inv(F)  # [n, 5, 5]
    C = cov[:, :3, :3]
    rms_deg = np.rad2deg(np.sqrt(np.trace(C, axis1=1, axis2=2)))
    # error distribution of an efficient estimator: |w|, w ~ N(0, C_i); 200 draws per image
    L = np.linalg.cholesky(C)
    z = rng.standard_normal((len(C), 200, 3))
    err = np.rad2deg(np.linalg.norm(np.einsum("nij,nsj->nsi", L, z), axis=-1))  # [n, 200]
    p_below2 = (err < 2.0).mean(1)  # per image P(error < 2 deg) at the bound
    # known shifts (rotation block of I only): how much the unknown shifts cost
    rms_known_shift = np.rad2deg(np.sqrt(np.trace(np.linalg.inv(F[:, :3, :3]), axis1=1, axis2=2)))
    shift_rms_px = np.sqrt(np.trace(cov[:, 3:, 3:], axis1=1, axis2=2))
    return dict(
        data=f"{cfg['structure']}, D={cfg['box_size']}, {cfg['pixel_size']} A/px, SNR {cfg['snr']:g}",
        sim_dir=os.path.relpath(sim_dir, ROOT), n_images=int(n), noise_sigma=sigma,
        residual_variance_over_sigma2=float(resv.mean() / sigma ** 2),
        median_crb_rms_angle_deg=float(np.median(rms_deg)),
        mean_crb_rms_angle_deg=float(rms_deg.mean()),
        quantiles_crb_rms_angle_deg={q: float(np.quantile(rms_deg, q)) for q in (0.1, 0.25, 0.75, 0.9)},
        frac_images_crb_rms_below_2deg=float((rms_deg < 2.0).mean()),
        predicted_median_error_deg=float(np.median(err)),
        predicted_mean_error_deg=float(err.mean()),
        predicted_frac_error_below_2deg=float(p_below2.mean()),
        median_crb_rms_angle_known_shift_deg=float(np.median(rms_known_shift)),
        median_crb_shift_rms_px=float(np.median(shift_rms_px)),
        seconds=time.time() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-images", type=int, default=500)
    ap.add_argument("--batch", type=int, default=50)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    out = {}
    for name, d in SIMS.items():
        if not os.path.exists(os.path.join(d, "particles.mrcs")):
            print(f"{name}: no data at {d}, skipped")
            continue
        out[name] = r = bound_for(d, a.n_images, a.batch, rng)
        print(f"{name} ({r['data']}, {r['n_images']} images): residual var / sigma^2 = "
              f"{r['residual_variance_over_sigma2']:.4f}")
        print(f"  CRB RMS angle per image: median {r['median_crb_rms_angle_deg']:.2f} deg "
              f"(10-90%: {r['quantiles_crb_rms_angle_deg'][0.1]:.2f}-{r['quantiles_crb_rms_angle_deg'][0.9]:.2f}); "
              f"images with RMS < 2 deg: {100 * r['frac_images_crb_rms_below_2deg']:.1f}%")
        print(f"  efficient estimator: median error {r['predicted_median_error_deg']:.2f} deg, mean "
              f"{r['predicted_mean_error_deg']:.2f}, P(error < 2 deg) {r['predicted_frac_error_below_2deg']:.3f}; "
              f"with known shifts median RMS {r['median_crb_rms_angle_known_shift_deg']:.2f} deg; "
              f"shift RMS {r['median_crb_shift_rms_px']:.3f} px ({r['seconds']:.0f} s)", flush=True)
    out["load_average"] = os.getloadavg()
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
