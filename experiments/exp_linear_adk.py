"""Linear models on the AdK transition data set, against RECOVAR.

Data: ``jaxhet simulate --structure adk-transition -n 10000 --box 32 --pixel-size 4 --snr 0.05``
(10^4 images uniform over the 98 frames of the closed -> open path; made here if absent).

jaxhet pipeline (timed stage by stage): mean map by CG -> solvent mask and noise spectrum
-> covariance from images (principal volumes) -> PPCA by EM at D = 32 -> spectral
volumes (diffusion map of the PPCA coefficients, kernel reconstructions along the first
coordinate, optional likelihood refinement of each image's position on the manifold).

Metrics (CryoBench style): Spearman |rho| between the first coefficient (and the manifold
coordinate) and the true frame; mean per-image FSC-AUC (``jaxhet.analysis.map_fsc_auc``,
area to Nyquist, perfect ~0.5) of the map each method gives for the image vs
``gt/frame_{label}.mrc``, over 100 random images (seed 0); wall time.

RECOVAR (PyPI ``recovar``, installed in its own venv because it pins jax 0.9): ``recovar
pipeline`` on the same particles (cryoDRGN pkls, ``--mask from_halfmaps --zdim 4``), then
``recovar compute_state`` (its kernel regression) at the 4-D embeddings of the same 100
images; Spearman of its first latent coordinate. Its run can be reused
(``--recovar-out``): the pipeline's own wall time is then read from its job.json.

Usage:
    python experiments/exp_linear_adk.py [--data DIR] [--recovar-venv /work/recovar-venv]
        [--recovar-out DIR] [--skip-recovar] [--k 4] [--ppca-iters 8]
Writes experiments/results/linear_adk.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from scipy.stats import spearmanr

HERE = os.path.dirname(os.path.abspath(__file__))


def simulate_if_missing(d: str) -> None:
    if os.path.exists(os.path.join(d, "labels.npy")):
        return
    from jaxhet.sim import SimulationParams, simulate_dataset
    cwd = os.getcwd()
    os.makedirs(d, exist_ok=True)
    os.chdir(d)  # (the simulator writes stack names relative to the working directory)
    try:
        simulate_dataset(".", "adk-transition", SimulationParams(n_images=10000, box_size=32, pixel_size=4.0,
                                                                 snr=0.05, seed=0), progress=True)
    finally:
        os.chdir(cwd)


def fsc_aucs(maps_fn, sel, labels, gt):
    from jaxhet.analysis import map_fsc_auc
    return np.asarray([map_fsc_auc(maps_fn(i), gt[labels[i]]) for i in sel])


def run_jaxhet(d: str, k: int, ppca_iters: int, sel, labels, gt, refine: int, bandwidth: float, nodes: int):
    from jaxhet import io as jio
    from jaxhet.inference import (default_mask, estimate_covariance, fit_ppca, noise_psd_from_residuals,
                                  posterior_coefficients, prepare_images, solve_mean, spectral_volumes)
    T, R = {}, {}
    t0 = time.time()
    ds = jio.ParticleDataset(jio.read_particles(os.path.join(d, "particles.star"), datadir=d))
    data = prepare_images(ds, batch_size=256)
    T["load"] = time.time() - t0
    t = time.time()
    mres = solve_mean(data)
    T["mean_cg"] = time.time() - t
    R["mean_cg_iterations"] = int(mres.cg.n_iter)
    R["mean_cg_residual"] = float(mres.cg.residual_norms[-1])
    t = time.time()
    mask = default_mask(mres.volume, data.pixel_size)
    psd = noise_psd_from_residuals(data, mres.volume)
    T["mask_noise"] = time.time() - t
    t = time.time()
    cov = estimate_covariance(data, mres.volume, psd, n_components=k, mask=mask)
    T["covariance"] = time.time() - t
    t = time.time()
    vols_cov = np.concatenate([(mres.volume * mask)[None], cov.components])
    mu_cov, _, _ = posterior_coefficients(data, vols_cov, psd)
    T["covariance_coefficients"] = time.time() - t
    R["covariance_eigenvalues"] = cov.eigenvalues.tolist()
    R["covariance_radius"] = cov.radius
    t = time.time()
    pp = fit_ppca(data, k, mean_volume=mres.volume, mean_inv_tau2=mres.inv_tau2, init_components=cov.components,
                  mask=mask, noise_psd=psd,
                  n_iter=ppca_iters, tol=0, progress=True)
    T["ppca"] = time.time() - t
    R["ppca_log_evidence"] = [float(x) for x in pp.log_evidence]
    spec = {}
    for r in sorted({0, refine}):
        t = time.time()
        sv = spectral_volumes(ds, pp.mu, n_nodes=nodes, bandwidth=bandwidth, mask=mask, refine_iter=r, prepared=data,
                              noise_psd=pp.noise_psd)
        spec[r] = (sv, time.time() - t)
    np.savez(os.path.join(HERE, "results", "linear_adk_latents.npz"), ppca_mu=pp.mu, cov_mu=mu_cov,
             u0=spec[0][0].u, u=spec[refine][0].u)
    lab = labels
    out = {}
    mean_masked = mres.volume * mask
    out["mean map (CG, masked)"] = dict(
        fsc_auc=float(fsc_aucs(lambda i: mean_masked, sel, lab, gt).mean()), spearman=None,
        seconds=T["load"] + T["mean_cg"] + T["mask_noise"])
    base = T["load"] + T["mean_cg"] + T["mask_noise"]
    out["covariance (K=%d), V(b)" % k] = dict(
        fsc_auc=float(fsc_aucs(lambda i: vols_cov[0] + np.tensordot(mu_cov[i], vols_cov[1:], 1), sel, lab, gt).mean()),
        spearman=float(abs(spearmanr(mu_cov[:, 0], lab).correlation)),
        seconds=base + T["covariance"] + T["covariance_coefficients"])
    tp = base + T["covariance"] + T["ppca"]
    out["PPCA (K=%d), V(b)" % k] = dict(
        fsc_auc=float(fsc_aucs(lambda i: pp.volumes[0] + np.tensordot(pp.mu[i], pp.volumes[1:], 1), sel, lab,
                               gt).mean()),
        spearman=float(abs(spearmanr(pp.mu[:, 0], lab).correlation)), seconds=tp)
    for r, (sv, ts) in spec.items():
        name = "PPCA + spectral volumes" + (f" (refined x{r})" if r else "")
        out[name] = dict(fsc_auc=float(fsc_aucs(lambda i: sv.map_of(sv.u[i]), sel, lab, gt).mean()),
                         spearman=float(abs(spearmanr(sv.u, lab).correlation)),
                         spearman_diffusion_coordinate=float(abs(spearmanr(sv.diffusion.coords[:, 0], lab).correlation)),
                         seconds=tp + ts)
    return out, T, R


def run_recovar(d: str, venv: str, out_dir: str | None, sel, labels, gt, work: str):
    """RECOVAR pipeline + compute_state at the evaluation images' embeddings."""
    import glob
    import pickle
    from jaxhet import io as jio
    rec = os.path.join(venv, "bin", "recovar")
    res = dict(available=os.path.exists(rec))
    if not res["available"]:
        res["error"] = f"{rec} not found"
        return res
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if out_dir is None or not os.path.exists(os.path.join(out_dir, "model")):
        out_dir = out_dir or os.path.join(work, "recovar_pipeline")
        cmd = [rec, "pipeline", os.path.join(d, "particles.mrcs"), "--poses", os.path.join(d, "poses.pkl"),
               "--ctf", os.path.join(d, "ctf.pkl"), "-o", out_dir, "--mask", "from_halfmaps", "--zdim", "4",
               "--accept-cpu"]
        t = time.time()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        res["pipeline_seconds"] = time.time() - t
        res["pipeline_command"] = " ".join(cmd)
        if p.returncode != 0:
            res["error"] = "pipeline failed: " + p.stderr[-2000:]
            return res
    else:
        with open(os.path.join(out_dir, "job.json")) as f:
            job = json.load(f)
        res["pipeline_seconds"] = _job_seconds(job)
        res["pipeline_reused"] = out_dir
    zfile = _recovar_latents(out_dir, venv)
    z = np.load(zfile)
    res["spearman"] = float(abs(spearmanr(z[:, 0], labels).correlation))
    pts = os.path.join(work, "recovar_points.txt")
    np.savetxt(pts, z[sel])
    cs_out = os.path.join(work, "recovar_states")
    cmd = [rec, "compute_state", out_dir, "--latent-points", pts, "-o", cs_out, "--particles",
           os.path.join(d, "particles.mrcs")]
    t = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    res["compute_state_seconds"] = time.time() - t
    res["compute_state_command"] = " ".join(cmd)
    if p.returncode != 0:
        res["error"] = "compute_state failed: " + p.stderr[-2000:]
        return res
    files = sorted(glob.glob(os.path.join(cs_out, "*.mrc")))  # <prefix>NNN.mrc (+ half maps)
    vols = _recovar_state_maps(files, len(sel))
    res["n_maps"] = len(vols)
    from jaxhet.analysis import map_fsc_auc
    res["fsc_auc"] = float(np.mean([map_fsc_auc(v, gt[labels[i]]) for v, i in zip(vols, sel)]))
    res["seconds"] = res["pipeline_seconds"] + res["compute_state_seconds"]
    del pickle, jio
    return res


def _job_seconds(job: dict) -> float:
    for key in ("duration_seconds", "elapsed_seconds", "runtime_seconds", "duration"):
        if key in job and isinstance(job[key], (int, float)):
            return float(job[key])
    from datetime import datetime
    a, b = job.get("started_at") or job.get("start_time"), job.get("finished_at") or job.get("end_time")
    return float((datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds())


def _recovar_latents(out_dir: str, venv: str) -> str:
    """Dump RECOVAR's 4-D embedding (input order) to an .npy with its own venv's python."""
    dst = os.path.join(out_dir, "jaxhet_zs_4.npy")
    if os.path.exists(dst):
        return dst
    code = ("import sys, numpy as np\n"
            "from recovar.output import PipelineOutput\n"
            "po = PipelineOutput(sys.argv[1])\n"
            "z = po.get_embedding_component('latent_coords', 4)\n"
            "np.save(sys.argv[2], np.asarray(z))\n")
    subprocess.run([os.path.join(venv, "bin", "python"), "-c", code, out_dir, dst], check=True)
    return dst


def _recovar_state_maps(files, n):
    """The n filtered state maps written by compute_state (``<prefix>NNN.mrc``), in order."""
    import re
    from jaxhet import io as jio
    per_point = {}
    for f in files:
        m = re.fullmatch(r"[A-Za-z_]*?(\d{3,})\.mrc", os.path.basename(f))
        if m:
            per_point[int(m.group(1))] = f
    keys = sorted(per_point)[:n]
    return [jio.read_mrc(per_point[k])[0] for k in keys]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/data_linear/adk")
    ap.add_argument("--recovar-venv", default="/work/recovar-venv")
    ap.add_argument("--recovar-out", default=None, help="reuse this finished `recovar pipeline` output")
    ap.add_argument("--skip-recovar", action="store_true")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ppca-iters", type=int, default=8)
    ap.add_argument("--refine", type=int, default=2, help="likelihood refinements of the spectral coordinate")
    ap.add_argument("--bandwidth", type=float, default=0.2)
    ap.add_argument("--nodes", type=int, default=15)
    ap.add_argument("--work", default="/tmp/exp_linear_adk")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "linear_adk.json"))
    args = ap.parse_args(argv)
    from jaxhet import io as jio
    simulate_if_missing(args.data)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    labels = np.load(os.path.join(args.data, "labels.npy"))
    gt = np.stack([jio.read_mrc(os.path.join(args.data, "gt", f"frame_{f:03d}.mrc"))[0] for f in range(labels.max() + 1)])
    sel = np.random.default_rng(0).choice(len(labels), 100, replace=False)
    rows, T, R = run_jaxhet(args.data, args.k, args.ppca_iters, sel, labels, gt, args.refine, args.bandwidth,
                            args.nodes)
    result = dict(data=args.data, n_images=int(len(labels)), eval_images=sel.tolist(), methods=rows,
                  jaxhet_stage_seconds=T, jaxhet_details=R,
                  machine="2 CPU cores shared with other jobs (timings include contention)")
    if not args.skip_recovar:
        try:
            result["recovar"] = run_recovar(args.data, args.recovar_venv, args.recovar_out, sel, labels, gt, args.work)
        except Exception as e:  # report precisely why it could not run
            result["recovar"] = dict(error=f"{type(e).__name__}: {e}")
        r = result["recovar"]
        if "fsc_auc" in r:
            rows["RECOVAR (zdim 4, kernel regression)"] = dict(fsc_auc=r["fsc_auc"], spearman=r.get("spearman"),
                                                               seconds=r.get("seconds"))
    print(f"{'method':42s} {'Spearman |rho|':>15s} {'FSC-AUC':>9s} {'time (s)':>9s}")
    for name, v in rows.items():
        sp = "-" if v.get("spearman") is None else f"{v['spearman']:.3f}"
        print(f"{name:42s} {sp:>15s} {v['fsc_auc']:9.4f} {v['seconds']:9.0f}")
    if "recovar" in result and "error" in result["recovar"]:
        print("RECOVAR:", result["recovar"]["error"][:500])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
