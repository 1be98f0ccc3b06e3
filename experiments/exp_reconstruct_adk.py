"""Known-pose reconstruction: jaxhet reconstruct vs cryoDRGN backproject_voxel (issue 3).

Data: ``jaxhet simulate --structure adk-closed -n 10000 --box 64 --pixel-size 2 --snr 0.1``
(one AdK conformation, uniform orientations, CTF, white noise at SNR 0.1). Both tools read
the same particles.mrcs + poses.pkl + ctf.pkl and run end to end as command-line programs
(reading, reconstructing half maps and the full map, writing): wall time and CPU time
(user + sys, /usr/bin/time) of each. cryoDRGN inverts the data by default, which matches
its CTF sign on RELION-convention data (CONVENTIONS.md).

Accuracy: FSC-AUC of each full map against the ground-truth map (CryoBench: area up to
Nyquist in cycles/px, "raw" perfect ~0.5; "normalized" = raw / 0.5), unmasked and with the
same soft mask (from the ground-truth map) applied to both maps, and each map multiplied by
its own automatic solvent mask (jaxhet.analysis.solvent_mask, the same procedure for both).
jaxhet is also evaluated with the Wiener variants ``voxel`` (RELION's per-voxel 1/tau^2)
and ``none``, without its outer spherical mask (``--no-outer-mask``; the default is RELION's
``softMaskOutsideMap`` at radius D/2, 3 px cosine edge) and with a particle-diameter mask
(``--mask-diameter 100``: AdK's 99.99%-mass radius is ~31 A). For a like-for-like view, the
cryoDRGN map is also scored after the same outer masks (post hoc,
``jaxhet.inference.soft_mask_outside_map``).

    python experiments/exp_reconstruct_adk.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".venv", "bin")
OUT = os.path.join(ROOT, "experiments", "out", "reconstruct_adk")
RESULTS = os.path.join(ROOT, "experiments", "results", "reconstruct_adk.json")
REPEATS = int(os.environ.get("REPEATS", "3"))


def timed(cmd, log):
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.time() - t0
    txt = open(log).read()
    if r.returncode:
        sys.exit(f"{cmd[0]} failed, see {log}")
    cpu = float(re.search(r"User time \(seconds\): ([\d.]+)", txt).group(1)) + \
        float(re.search(r"System time \(seconds\): ([\d.]+)", txt).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", txt).group(1)) / 1024
    return dict(wall_s=round(wall, 2), cpu_s=round(cpu, 2), peak_rss_mb=round(rss, 1))


def main():
    from jaxhet.analysis import fsc, fsc_auc, solvent_mask
    from jaxhet.io import read_mrc

    sim = os.path.join(OUT, "sim")
    if not os.path.exists(os.path.join(sim, "particles.mrcs")):
        subprocess.run([os.path.join(BIN, "jaxhet"), "simulate", "--structure", "adk-closed", "-n", "10000", "--box",
                        "64", "--pixel-size", "2", "--snr", "0.1", "-o", sim, "--seed", "0"], check=True)
    stack, poses, ctf = (os.path.join(sim, f) for f in ("particles.mrcs", "poses.pkl", "ctf.pkl"))
    gt, _ = read_mrc(os.path.join(sim, "gt", "frame_000.mrc"))
    load = os.getloadavg()
    runs = {}
    # jaxhet (default: shell Wiener filter), then cryoDRGN; each end to end, alternating,
    # REPEATS times: the median of each (a single run of either varies by up to ~40%)
    jdir = os.path.join(OUT, "jaxhet")
    cdir = os.path.join(OUT, "cryodrgn")
    cmds = {"jaxhet": [os.path.join(BIN, "jaxhet"), "reconstruct", stack, "--poses", poses, "--ctf", ctf,
                       "-o", os.path.join(jdir, "map.mrc"), "--force"],
            "cryodrgn": [os.path.join(BIN, "cryodrgn"), "backproject_voxel", stack, "--poses", poses, "--ctf",
                         ctf, "-o", cdir]}
    every = {k: [] for k in cmds}
    for _ in range(REPEATS):
        for name, cmd in cmds.items():
            every[name].append(timed(cmd, os.path.join(OUT, f"{name}.log")))
    for name, rs in every.items():
        runs[name] = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        runs[name]["all_runs"] = rs
    maps = {"jaxhet": read_mrc(os.path.join(jdir, "map.mrc"))[0],
            "cryodrgn": read_mrc(os.path.join(cdir, "backproject.mrc"))[0]}
    # jaxhet variants (not timed)
    variants = {"jaxhet_wiener_voxel": ["--wiener", "voxel"], "jaxhet_wiener_none": ["--wiener", "none"],
                "jaxhet_no_outer_mask": ["--no-outer-mask"], "jaxhet_mask_diameter_100A": ["--mask-diameter", "100"]}
    for name, extra in variants.items():
        vdir = os.path.join(OUT, name)
        subprocess.run([os.path.join(BIN, "jaxhet"), "reconstruct", stack, "--poses", poses, "--ctf", ctf, "-o",
                        os.path.join(vdir, "map.mrc"), *extra, "--force"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        maps[name] = read_mrc(os.path.join(vdir, "map.mrc"))[0]
    from jaxhet.inference import soft_mask_outside_map
    maps["cryodrgn_outer_mask_posthoc"] = soft_mask_outside_map(maps["cryodrgn"])
    maps["cryodrgn_mask_diameter_100A_posthoc"] = soft_mask_outside_map(maps["cryodrgn"], radius=25.0)
    gt_mask = solvent_mask(gt, 2.0)
    table = {}
    for name, m in maps.items():
        own = solvent_mask(m, 2.0)
        c_un, c_gm, c_own = fsc(m, gt), fsc(m, gt, gt_mask), fsc(m * own, gt)
        table[name] = dict(
            fsc_auc_unmasked=fsc_auc(c_un), fsc_auc_unmasked_normalized=fsc_auc(c_un, True),
            fsc_auc_gt_mask_normalized=fsc_auc(c_gm, True), fsc_auc_own_solvent_mask_normalized=fsc_auc(c_own, True),
            mse_after_scale=float(np.mean(((m * (m * gt).sum() / (m * m).sum()) - gt) ** 2)))
    perfect = fsc_auc(fsc(gt, gt), True)
    res = dict(data="jaxhet simulate adk-closed, 10000 images, D=64, 2 A/px, SNR 0.1", load_average=load,
               note=f"timings: median of {REPEATS} alternating end-to-end runs of each tool on a 2-core machine "
                    "with no other job running; compare the ratio, not the seconds",
               runs=runs, accuracy=table, speedup_wall=runs["cryodrgn"]["wall_s"] / runs["jaxhet"]["wall_s"],
               speedup_cpu=runs["cryodrgn"]["cpu_s"] / runs["jaxhet"]["cpu_s"],
               perfect_map_fsc_auc_normalized=perfect)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(res, f, indent=1)
    print(f"load average at start: {load}")
    print(f"{'tool':10s} {'wall s':>8s} {'CPU s':>8s} {'RSS MB':>8s}")
    for k, v in runs.items():
        print(f"{k:10s} {v['wall_s']:8.1f} {v['cpu_s']:8.1f} {v['peak_rss_mb']:8.0f}   (wall of each run: "
              + ", ".join(f"{r['wall_s']:.1f}" for r in v["all_runs"]) + ")")
    print(f"speed-up (cryoDRGN / jaxhet): wall {res['speedup_wall']:.1f}x, CPU {res['speedup_cpu']:.1f}x")
    print(f"\nFSC-AUC vs ground truth (normalized; a perfect map scores {perfect:.4f} at D=64)")
    print(f"{'map':36s} {'unmasked':>9s} {'raw':>7s} {'GT mask':>8s} {'own mask':>9s} {'MSE':>10s}")
    for k, v in table.items():
        print(f"{k:36s} {v['fsc_auc_unmasked_normalized']:9.4f} {v['fsc_auc_unmasked']:7.4f} "
              f"{v['fsc_auc_gt_mask_normalized']:8.4f} {v['fsc_auc_own_solvent_mask_normalized']:9.4f} "
              f"{v['mse_after_scale']:10.3g}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
