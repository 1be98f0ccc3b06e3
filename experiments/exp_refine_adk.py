"""Refinement from poses perturbed by 15 degrees (issue 3).

Data: the same simulation as exp_reconstruct_adk.py (adk-closed, 10000 images, D=64,
2 A/px, SNR 0.1). Every true orientation is rotated by exactly 15 degrees about a random
axis (A_i <- A_i exp([15 deg] u_i)); origins are kept. ``jaxhet.inference.refine``
(gold-standard halves, local searches shrinking from +/-21 deg, translations +/-1 px)
starts from half maps reconstructed with the perturbed poses, low-passed to 20 A.

Reported per iteration: median / mean angular error to the true orientations, the
half-map resolution, the posterior spread; at the end the FSC-AUC of the refined map
against the ground truth (and of the known-pose map for reference).

Information floor: the same E-step with the *ground-truth* map as reference, started at
the true poses (local grid +/-6 deg, step 1 deg, all frequencies to Nyquist), on 1000
images: the median error of its pose estimate is what a perfect reference allows at
this SNR. With ``--estimate mean`` this "floor" is optimistic: the window is centred on the
true pose, so a posterior mean over it shrinks towards the truth (a prior no refinement
has); the Cramer-Rao bound of experiments/exp_pose_bound.py is the reference.

    python experiments/exp_refine_adk.py [--iterations 6]
    python experiments/exp_refine_adk.py --snr 1.0 --n-images 5000   # a higher-SNR control
    python experiments/exp_refine_adk.py --estimate mean --final-step 0.5 --final-iterations 2 --tag mean
    python experiments/exp_refine_adk.py --estimate mean --leave-out-folds 4 --tag mean_loo4

    python experiments/exp_refine_adk.py --self-bias-check   # after a run: E-step diagnostic

``--self-bias-check`` (a few minutes, no refinement) takes the poses of the last
checkpoint, reconstructs the gold-standard half maps as ``refine`` does, and runs one local
E-step (posterior mean, +/-6 deg, step 1.25) for 500 images of half 1 against (a) their own
half map, which contains them, and (b) the other half map, which does not: if the images'
own noise in the reference anchors them to their previous poses, (a) moves them little and
reports an over-confident spread, (b) moves them further and gets closer to the truth.
Results: refine_adk_self_bias.json.

Options: the local pose estimate (``--estimate near|mean``), the M-step (``--m-step``),
extra final iterations on a finer grid (``--final-step``); the Cramer-Rao bound of
experiments/exp_pose_bound.py is copied into the results when it exists.

With ``--snr`` other than 0.1 the data are simulated anew (same settings, that SNR) into
experiments/out/refine_adk_snrS/ and the results go to refine_adk_snrS.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM = os.path.join(ROOT, "experiments", "out", "reconstruct_adk", "sim")
OUT = os.path.join(ROOT, "experiments", "out", "refine_adk")
RESULTS = os.path.join(ROOT, "experiments", "results", "refine_adk.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--perturbation", type=float, default=15.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--n-images", type=int, default=10000)
    ap.add_argument("--estimate", choices=["near", "mean"], default="near",
                    help="local pose estimate: posterior mean next to the best grid pose, or over the window")
    ap.add_argument("--m-step", choices=["best", "topk"], default="best")
    ap.add_argument("--final-step", type=float, default=None,
                    help="extra final local iterations at this angular step (deg), range 4 x step")
    ap.add_argument("--final-iterations", type=int, default=0, help="how many of those")
    ap.add_argument("--floor-images", type=int, default=1000)
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--patience", type=int, default=2,
                    help="refine(patience=...): stop when the resolution stops improving, keep the best iteration "
                         "(0: the whole schedule, the last iteration; runs before this option existed)")
    ap.add_argument("--snr-from", choices=["masked", "unmasked"], default="unmasked",
                    help="refine(snr_from=...): the FSC that sets the references' Wiener filter")
    ap.add_argument("--leave-out-folds", type=int, default=0,
                    help="align each fold to its half map without its own images (refine(leave_out_folds=K))")
    a = ap.parse_args()
    global SIM, OUT, RESULTS
    suffix = f"_{a.tag}" if a.tag else ""
    RESULTS = RESULTS.replace(".json", f"{suffix}.json")
    if a.snr != 0.1 or a.n_images != 10000:
        tag = f"snr{a.snr:g}_n{a.n_images}"
        OUT = os.path.join(ROOT, "experiments", "out", f"refine_adk_{tag}")
        SIM = os.path.join(OUT, "sim")
        RESULTS = os.path.join(ROOT, "experiments", "results", f"refine_adk_{tag}{suffix}.json")
        if not os.path.exists(os.path.join(SIM, "particles.mrcs")):
            subprocess.run([os.path.join(ROOT, ".venv", "bin", "jaxhet"), "simulate", "--structure", "adk-closed",
                            "-n", str(a.n_images), "--box", "64", "--pixel-size", "2", "--snr", str(a.snr),
                            "-o", SIM, "--seed", "1"], check=True)
    import jax.numpy as jnp
    from jaxhet.analysis import map_fsc_auc
    from jaxhet.core import axis_angle_to_matrix, rotation_angle_between
    from jaxhet.inference import (SearchStage, default_local_schedule, local_pose_search, prepare_reference, refine)
    from jaxhet.io import ParticleDataset, read_mrc, read_particles

    if not os.path.exists(os.path.join(SIM, "particles.mrcs")):
        subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"),
                        os.path.join(ROOT, "experiments", "exp_reconstruct_adk.py")], check=True)
    os.makedirs(OUT, exist_ok=True)
    table = read_particles(os.path.join(SIM, "particles.mrcs"), poses=os.path.join(SIM, "poses.pkl"),
                           ctf=os.path.join(SIM, "ctf.pkl"))
    ds = ParticleDataset(table)
    gt, _ = read_mrc(os.path.join(SIM, "gt", "frame_000.mrc"))
    R_true = table.rotation_matrices()
    N = len(table)
    rng = np.random.default_rng(7)
    ax = rng.normal(size=(N, 3))
    ax /= np.linalg.norm(ax, axis=1, keepdims=True)
    dR = np.asarray(axis_angle_to_matrix(jnp.asarray(ax * np.deg2rad(a.perturbation), jnp.float32)))
    R0 = np.einsum("nij,njk->nik", R_true, dR).astype(np.float32)
    err0 = np.asarray(rotation_angle_between(jnp.asarray(R0), jnp.asarray(R_true)))
    print(f"start: median error {np.median(err0):.2f} deg", flush=True)

    # information floor: perfect reference, true poses, local posterior mean
    pix = ds.pixel_size_in_angstroms
    spec = prepare_reference(gt, pix)
    noise_sigma = json.load(open(os.path.join(SIM, "sim_config.json")))["noise_sigma"]
    rows = np.arange(min(N, a.floor_images))
    b = ds.get_batch(rows)
    noise = np.full(ds.image_size // 2 + 1, float(noise_sigma) ** 2)
    fl = local_pose_search(spec, b.images, b.ctf, R_true[rows], -b.origin_in_pixels, noise, pix,
                           SearchStage("local", 1.0, 6.0, 0.0), max_radius=ds.image_size // 2 - 1,
                           estimate=a.estimate)
    floor_err = np.asarray(rotation_angle_between(fl.rotations, jnp.asarray(R_true[rows])))
    floor_best = np.asarray(rotation_angle_between(fl.best_rotations, jnp.asarray(R_true[rows])))
    print(f"information floor (ground-truth map, true start): median error {np.median(floor_err):.2f} deg "
          f"(grid best {np.median(floor_best):.2f}), median posterior spread "
          f"{np.median(np.asarray(fl.angular_spread_in_degrees)):.2f} deg", flush=True)

    hist = []

    def cb(it, info, rot, org, half_maps):
        e = np.asarray(rotation_angle_between(jnp.asarray(rot), jnp.asarray(R_true)))
        info = dict(info, median_error=float(np.median(e)), mean_error=float(e.mean()),
                    frac_below_2deg=float((e < 2).mean()))
        hist.append(info)
        print(f"iter {it} ({info['kind']} +/-{info['angular_range']:.1f} step {info['angular_step']:.2f}): "
              f"median error {info['median_error']:.2f} deg, mean {info['mean_error']:.2f}, "
              f"<2 deg {info['frac_below_2deg']:.2f}; resolution {info['resolution_0143']:.2f} A; "
              f"spread {info['median_angular_spread']:.2f}; {info['seconds']:.0f} s", flush=True)
        np.savez(os.path.join(OUT, "checkpoint.npz"), rotations=rot, origins=org, iteration=it)

    t0 = time.time()
    sched = default_local_schedule(a.perturbation, a.iterations, shift_range=1.0)
    if a.final_step:
        sched += [SearchStage("local", a.final_step, 4 * a.final_step, 0.5, 0.25)] * a.final_iterations
    res = refine(ds, rotations=R0, origin_in_pixels=table.origin_in_pixels.astype(np.float32), schedule=sched,
                 initial_resolution_in_angstroms=20.0, batch_size=a.batch_size, callback=cb,
                 pose_estimate=a.estimate, m_step=a.m_step, leave_out_folds=a.leave_out_folds, patience=a.patience,
                 snr_from=a.snr_from)
    wall = time.time() - t0
    e = np.asarray(rotation_angle_between(jnp.asarray(res.rotations), jnp.asarray(R_true)))
    auc = map_fsc_auc(res.reconstruction.volume, gt, normalized=True)
    from jaxhet.inference import reconstruct
    known_map = reconstruct(ds).volume  # same images, true poses
    out = dict(data=f"adk-closed, {N} images, D=64, 2 A/px, SNR {a.snr:g}", perturbation_deg=a.perturbation,
               start_median_error=float(np.median(err0)), final_median_error=float(np.median(e)),
               final_mean_error=float(e.mean()), final_frac_below_2deg=float((e < 2).mean()),
               floor_median_error_posterior_mean=float(np.median(floor_err)),
               floor_median_error_grid_best=float(np.median(floor_best)),
               refined_map_fsc_auc_normalized=auc,
               known_pose_map_fsc_auc_normalized=map_fsc_auc(known_map, gt, normalized=True),
               final_resolution_0143=res.reconstruction.resolution_0143, wall_s=wall,
               best_iteration=res.history[-1].get("best_iteration"),
               options=dict(estimate=a.estimate, m_step=a.m_step, leave_out_folds=a.leave_out_folds, patience=a.patience,
                            snr_from=a.snr_from, final_step=a.final_step,
                            final_iterations=a.final_iterations, iterations=a.iterations),
               cramer_rao=_bound(a.snr),
               load_average=os.getloadavg(), iterations=hist,
               schedule=[vars(s) for s in sched])
    with open(RESULTS, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nfinal: median angular error {out['final_median_error']:.2f} deg (start {out['start_median_error']:.1f}; "
          f"perfect-reference floor {out['floor_median_error_posterior_mean']:.2f}); "
          f"map FSC-AUC {auc:.4f} (known poses {out['known_pose_map_fsc_auc_normalized']:.4f}); {wall:.0f} s")
    print(f"wrote {RESULTS}")


def self_bias_check():
    import jax.numpy as jnp
    from jaxhet.core import rotation_angle_between
    from jaxhet.inference import (SearchStage, accumulate_batches, finalize_reconstruction, init_reconstruction,
                                  local_pose_search, prepare_reference, random_half)
    from jaxhet.io import ParticleDataset, read_particles

    table = read_particles(os.path.join(SIM, "particles.mrcs"), poses=os.path.join(SIM, "poses.pkl"),
                           ctf=os.path.join(SIM, "ctf.pkl"))
    ds = ParticleDataset(table)
    R_true = table.rotation_matrices()
    ck = np.load(os.path.join(OUT, "checkpoint.npz"))
    R, O = ck["rotations"], ck["origins"]
    pix, D = ds.pixel_size_in_angstroms, ds.image_size

    def batches():
        for b in ds.batches(256):
            yield b._replace(rotations=R[b.indices], origin_in_pixels=O[b.indices])

    st, _ = accumulate_batches(init_reconstruction(D), batches(), batch_size=256)
    rec = finalize_reconstruction(st, pix)
    rows = np.nonzero(random_half(np.arange(len(ds)), 0) == 0)[0][:500]
    b = ds.get_batch(rows)
    sigma = json.load(open(os.path.join(SIM, "sim_config.json")))["noise_sigma"]
    noise = np.full(D // 2 + 1, float(sigma) ** 2)
    rmax = min(D // 2 - 1, D * pix / rec.resolution_0143 + 3)
    err = lambda A: np.asarray(rotation_angle_between(jnp.asarray(A), jnp.asarray(R_true[rows])))  # noqa: E731
    out = dict(checkpoint_iteration=int(ck["iteration"]), n_images=len(rows), start_median_error=float(np.median(err(R[rows]))))
    for h, name in ((0, "own_half_map"), (1, "other_half_map")):
        spec = prepare_reference(rec.half_maps[h], pix, None, 0.45 * D)
        o = local_pose_search(spec, b.images, b.ctf, R[rows], -O[rows], noise, pix,
                              SearchStage("local", 1.25, 6.0, 0.5, 0.25), rmax, estimate="mean")
        move = np.asarray(rotation_angle_between(o.rotations, jnp.asarray(R[rows])))
        out[name] = dict(median_error=float(np.median(err(o.rotations))), median_move=float(np.median(move)),
                         median_spread=float(np.median(np.asarray(o.angular_spread_in_degrees))))
        print(f"reference = {name}: median error {out[name]['median_error']:.2f} deg (start "
              f"{out['start_median_error']:.2f}), median move {out[name]['median_move']:.2f}, spread "
              f"{out[name]['median_spread']:.2f}", flush=True)
    path = os.path.join(os.path.dirname(RESULTS), "refine_adk_self_bias.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


def _bound(snr):
    """The Cramer-Rao numbers of experiments/exp_pose_bound.py for this SNR, if computed."""
    p = os.path.join(ROOT, "experiments", "results", "pose_bound.json")
    if not os.path.exists(p):
        return None
    r = json.load(open(p)).get(f"snr{snr:g}")
    return None if r is None else {k: r[k] for k in ("predicted_median_error_deg", "median_crb_rms_angle_deg",
                                                      "predicted_frac_error_below_2deg", "n_images")}


if __name__ == "__main__":
    import sys
    if "--self-bias-check" in sys.argv[1:]:
        self_bias_check()
    else:
        main()
