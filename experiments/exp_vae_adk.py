"""jaxhet VAE vs cryoDRGN train_vae on the simulated AdK transition (issue 6 benchmark).

Data: ``jaxhet simulate --structure adk-transition`` (uniform over the 98 frames), D=32,
4 A/px, SNR 0.05, 10k images. Both tools: encoder and decoder 3x256, zdim 8, the same
batch size, the same .mrcs + poses.pkl + ctf.pkl (cryoDRGN inverts the data by default,
which matches its CTF sign on RELION-convention data: CONVENTIONS.md).

Metrics:
- latent: Spearman |rho| between the first latent PC and the true frame;
- maps: mean over 100 random images of the FSC-AUC (CryoBench, area up to Nyquist in
  cycles/px: perfect ~0.5) between the map at the image's latent and the ground-truth
  map of its frame;
- speed: training images/s (median over epochs) and images per CPU-second (whole
  process: user+sys), and peak RSS (``/usr/bin/time -v``).

Stages (each can be run alone; the long ones in the background, one tool at a time):

    python experiments/exp_vae_adk.py --stage simulate
    python experiments/exp_vae_adk.py --stage jaxhet   [--epochs 20] [--tag full]
    python experiments/exp_vae_adk.py --stage cryodrgn [--epochs 2]  [--tag e2]
    python experiments/exp_vae_adk.py --stage evaluate [--only jaxhet_e20,cryodrgn_e20]
    python experiments/exp_vae_adk.py --stage trajectory --only jaxhet_e20,cryodrgn_e20 [--epoch-list 1,5,10,20]
    python experiments/exp_vae_adk.py --stage tune --epochs 6 --tag NAME --set beta=0.25,window=False
    python experiments/exp_vae_adk.py --stage speed     # quiet machine only: both tools, 1 epoch each
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".venv", "bin")
RESULTS = os.path.join(ROOT, "experiments", "results", "vae_adk_d32.json")


def _timed(cmd, log):
    """Run cmd under /usr/bin/time -v; return (returncode, wall_s, cpu_s, peak_rss_MB)."""
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.time() - t0
    txt = open(log).read()
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", txt).group(1))
    sys_ = float(re.search(r"System time \(seconds\): ([\d.]+)", txt).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", txt).group(1)) / 1024
    return r.returncode, wall, user + sys_, rss


def _record(key, value):
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    res = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    res[key] = value
    with open(RESULTS, "w") as f:
        json.dump(res, f, indent=1)


def stage_simulate(a):
    cmd = [f"{BIN}/jaxhet", "simulate", "--structure", "adk-transition", "-n", str(a.n), "--box", "32",
           "--pixel-size", "4", "--snr", "0.05", "--gt-maps", "all", "--seed", "0", "-o", a.data]
    if os.path.exists(os.path.join(a.data, "particles.mrcs")):
        print("data exists:", a.data)
        return
    subprocess.run(cmd, check=True, cwd=ROOT)


def stage_jaxhet(a):
    out = os.path.join(a.work, f"jaxhet_{a.tag}")
    cmd = [f"{BIN}/jaxhet", "train", "vae", f"{a.data}/particles.mrcs", "--poses", f"{a.data}/poses.pkl",
           "--ctf", f"{a.data}/ctf.pkl", "-o", out, "--zdim", "8", "--epochs", str(a.epochs), "-b", str(a.batch_size),
           "--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256", "--dec-layers", "3", "--seed", "0",
           "--no-progress", "--save-every", "1", *a.extra]
    rc, wall, cpu, rss = _timed(cmd, out + ".log")
    if rc:
        raise SystemExit(f"jaxhet failed (rc {rc}), see {out}.log")
    hist = json.load(open(os.path.join(out, "history.json")))
    ips = [h["images_per_second"] for h in hist]
    n = json.load(open(os.path.join(out, "config.json")))["n_images"]
    rec = dict(command=" ".join(cmd), epochs=a.epochs, batch_size=a.batch_size, wall_s=wall, cpu_s=cpu,
               peak_rss_MB=rss, images_per_s_median=float(np.median(ips)), images_per_s_epochs=ips,
               images_per_cpu_s=n * a.epochs / cpu, out=out)
    _record(f"jaxhet_{a.tag}", rec)
    print(json.dumps(rec, indent=1))


def stage_finalize(a):
    """Write the outputs of an interrupted jaxhet run from its last checkpoint (resume with
    --epochs = the epochs it completed); speed comes from its history.json."""
    out = os.path.join(a.work, f"jaxhet_{a.tag}")
    hist = json.load(open(os.path.join(out, "history.json")))
    done = len(hist)
    cmd = [f"{BIN}/jaxhet", "train", "vae", f"{a.data}/particles.mrcs", "--poses", f"{a.data}/poses.pkl",
           "--ctf", f"{a.data}/ctf.pkl", "-o", out, "--zdim", "8", "--epochs", str(done), "--resume", "--no-progress"]
    rc, wall, cpu, rss = _timed(cmd, out + "_finalize.log")
    if rc:
        raise SystemExit(f"jaxhet finalize failed (rc {rc}), see {out}_finalize.log")
    ips = [h["images_per_second"] for h in hist]
    rec = dict(command="(interrupted run) " + " ".join(cmd), epochs=done, batch_size=a.batch_size,
               peak_rss_MB=None, images_per_s_median=float(np.median(ips)), images_per_s_epochs=ips,
               images_per_cpu_s=None, out=out)
    _record(f"jaxhet_{a.tag}", rec)
    print(json.dumps(rec, indent=1))


def stage_cryodrgn(a):
    out = os.path.join(a.work, f"cryodrgn_{a.tag}")
    cmd = [f"{BIN}/cryodrgn", "train_vae", f"{a.data}/particles.mrcs", "--poses", f"{a.data}/poses.pkl",
           "--ctf", f"{a.data}/ctf.pkl", "-o", out, "--zdim", "8", "-n", str(a.epochs), "-b", str(a.batch_size),
           "--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256", "--dec-layers", "3", "--seed", "0",
           "--no-analysis"]
    rc, wall, cpu, rss = _timed(cmd, out + ".log")
    if rc:
        raise SystemExit(f"cryodrgn failed (rc {rc}), see {out}.log")
    log = open(os.path.join(out, "run.log")).read()
    secs = []
    for h, m, s in re.findall(r"Epoch: \d+ Average gen loss.*Finished in (\d+):(\d+):([\d.]+)", log):
        secs.append(int(h) * 3600 + int(m) * 60 + float(s))
    n = len(np.load(os.path.join(a.data, "labels.npy")))
    ips = [n / s for s in secs]
    rec = dict(command=" ".join(cmd), epochs=a.epochs, batch_size=a.batch_size, wall_s=wall, cpu_s=cpu,
               peak_rss_MB=rss, images_per_s_median=float(np.median(ips)) if ips else None,
               images_per_s_epochs=ips, images_per_cpu_s=n * a.epochs / cpu, out=out)
    _record(f"cryodrgn_{a.tag}", rec)
    print(json.dumps(rec, indent=1))


def stage_cryodrgn_record(a):
    """Record a cryoDRGN run that was interrupted and resumed outside ``--stage cryodrgn``
    (``train_vae --load``): speed from its run.log epoch timers; wall/CPU/RSS unknown."""
    out = os.path.join(a.work, f"cryodrgn_{a.tag}")
    log = open(os.path.join(out, "run.log")).read()
    cmd = " ; then ".join(l.strip() for l in log.splitlines() if "cryodrgn train_vae" in l and "Namespace" not in l)
    secs = [int(h) * 3600 + int(m) * 60 + float(s_) for h, m, s_ in
            re.findall(r"Epoch: \d+ Average gen loss.*Finished in (\d+):(\d+):([\d.]+)", log)]
    n = len(np.load(os.path.join(a.data, "labels.npy")))
    ips = [n / x for x in secs]
    if not os.path.exists(os.path.join(out, "weights.pkl")):
        raise SystemExit(f"{out}: no weights.pkl (run not finished)")
    rec = dict(command="(interrupted and resumed run) " + cmd, epochs=len(secs), batch_size=a.batch_size,
               peak_rss_MB=None, images_per_s_median=float(np.median(ips)) if ips else None,
               images_per_s_epochs=ips, images_per_cpu_s=None, out=out)
    _record(f"cryodrgn_{a.tag}", rec)
    print(json.dumps(rec, indent=1))


def stage_speed(a):
    """Training speed of both tools, same architecture and data, one after the other.

    Run it on a QUIET machine (the lead does): earlier numbers taken under load were off by
    up to 10x for cryoDRGN. Each tool trains ``--speed-epochs`` epochs (default 1) on the
    full data set from scratch, under ``/usr/bin/time -v``. Recorded under ``speed_idle``:
    the tool's own epoch timer (images/s of its last epoch; jaxhet's first epoch includes
    the jit compilation), whole-process images per wall-second and per CPU-second
    (user+sys, startup and data loading included), peak RSS, and the load average before
    each run.
    """
    n = len(np.load(os.path.join(a.data, "labels.npy")))
    E = a.speed_epochs
    arch = ["--zdim", "8", "-b", str(a.batch_size), "--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256",
            "--dec-layers", "3", "--seed", "0"]
    inp = [f"{a.data}/particles.mrcs", "--poses", f"{a.data}/poses.pkl", "--ctf", f"{a.data}/ctf.pkl"]
    rec = dict(n_images=n, epochs=E, batch_size=a.batch_size, nproc=os.cpu_count(), tools={})
    for tool in ("jaxhet", "cryodrgn"):
        out = os.path.join(a.work, f"speed_{tool}")
        if os.path.exists(out):
            import shutil
            shutil.rmtree(out)  # our own scratch output from a previous speed run
        if tool == "jaxhet":
            cmd = [f"{BIN}/jaxhet", "train", "vae", *inp, "-o", out, "--epochs", str(E), *arch, "--no-progress"]
        else:
            cmd = [f"{BIN}/cryodrgn", "train_vae", *inp, "-o", out, "-n", str(E), *arch, "--no-analysis"]
        load = os.getloadavg()
        rc, wall, cpu, rss = _timed(cmd, out + ".log")
        if rc:
            raise SystemExit(f"{tool} failed (rc {rc}), see {out}.log")
        if tool == "jaxhet":
            ips = [h["images_per_second"] for h in json.load(open(os.path.join(out, "history.json")))]
        else:
            log = open(os.path.join(out, "run.log")).read()
            ips = [n / (int(h) * 3600 + int(m) * 60 + float(s_)) for h, m, s_ in
                   re.findall(r"Epoch: \d+ Average gen loss.*Finished in (\d+):(\d+):([\d.]+)", log)]
        rec["tools"][tool] = dict(command=" ".join(cmd), images_per_s_epochs=ips,
                                  images_per_s_last_epoch=ips[-1] if ips else None,
                                  images_per_wall_s=n * E / wall, images_per_cpu_s=n * E / cpu, wall_s=wall,
                                  cpu_s=cpu, peak_rss_MB=rss, loadavg_before=list(load))
        print(tool, json.dumps(rec["tools"][tool], indent=1), flush=True)
    j, c = rec["tools"]["jaxhet"], rec["tools"]["cryodrgn"]
    rec["ratio_jaxhet_over_cryodrgn"] = dict(
        images_per_s_last_epoch=(j["images_per_s_last_epoch"] or np.nan) / (c["images_per_s_last_epoch"] or np.nan),
        images_per_cpu_s=j["images_per_cpu_s"] / c["images_per_cpu_s"])
    _record("speed_idle", rec)
    print(json.dumps(rec["ratio_jaxhet_over_cryodrgn"]))


def _spearman_pc1(z, labels):
    from scipy.stats import spearmanr
    zc = z - z.mean(0)
    pc1 = zc @ np.linalg.svd(zc, full_matrices=False)[2][0]
    return abs(float(spearmanr(pc1, labels).statistic))


def _gt_maps(data):
    from jaxhet.io import read_mrc
    files = sorted(glob.glob(os.path.join(data, "gt", "frame_*.mrc")))
    return {int(re.search(r"frame_(\d+)", f).group(1)): read_mrc(f)[0] for f in files}


def _fsc_auc_mean(maps, frames, gt):
    from jaxhet.analysis import map_fsc_auc
    return [map_fsc_auc(m, gt[int(f)]) for m, f in zip(maps, frames)]


def _jaxhet_maps(out, idx):
    import jax.numpy as jnp
    from jaxhet.inference import load_vae
    from jaxhet.cli._evalvol import maps_at_latents
    model, conf, z = load_vae(out)
    return z, maps_at_latents(model, z[idx], conf["box_size"], conf["pixel_size"])


def _cryodrgn_maps(out, idx, work, epoch=None):
    sfx = "" if epoch is None else f".{epoch}"
    with open(os.path.join(out, f"z{sfx}.pkl"), "rb") as f:
        z = pickle.load(f)
    zf = os.path.join(work, "cryodrgn_eval_z.txt")
    np.savetxt(zf, z[idx])
    vdir = os.path.join(work, "cryodrgn_eval_vols")
    if os.path.isdir(vdir):
        for old in glob.glob(os.path.join(vdir, "vol_*.mrc")):
            os.remove(old)
    subprocess.run([f"{BIN}/cryodrgn", "eval_vol", os.path.join(out, f"weights{sfx}.pkl"), "-c",
                    os.path.join(out, "config.yaml"), "--zfile", zf, "-o", vdir], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from jaxhet.io import read_mrc
    files = sorted(glob.glob(os.path.join(vdir, "vol_*.mrc")))
    return z, [read_mrc(f)[0] for f in files]


def _jaxhet_epoch_maps(out, idx, epoch):
    from jaxhet.cli._evalvol import maps_at_latents
    from jaxhet.models import load_model
    z = np.load(os.path.join(out, "epochs", f"latents.{epoch}.npy"))
    model = load_model(os.path.join(out, "epochs", f"model.{epoch}.npz"))
    conf = json.load(open(os.path.join(out, "config.json"))) if os.path.exists(os.path.join(out, "config.json")) \
        else dict(box_size=32, pixel_size=4.0)
    return z, maps_at_latents(model, z[idx], conf["box_size"], conf["pixel_size"])


def stage_trajectory(a):
    """rho and FSC-AUC after each saved epoch of the runs in --only (jaxhet: OUT/epochs/,
    written with --save-every; cryoDRGN: its z.<e>.pkl / weights.<e>.pkl). Epochs from
    --epoch-list (default all saved). Recorded as ``<run>["per_epoch"]``."""
    labels = np.load(os.path.join(a.data, "labels.npy"))
    gt = _gt_maps(a.data)
    idx = np.sort(np.random.default_rng(0).choice(len(labels), 100, replace=False))
    res = json.load(open(RESULTS))
    for key in a.only.split(","):
        out = res[key]["out"]
        if key.startswith("jaxhet_"):
            saved = sorted(int(re.search(r"latents\.(\d+)\.npy", f).group(1))
                           for f in glob.glob(os.path.join(out, "epochs", "latents.*.npy")))
        else:
            saved = sorted(int(re.search(r"z\.(\d+)\.pkl", f).group(1)) for f in glob.glob(os.path.join(out, "z.*.pkl")))
        want = saved if not a.epoch_list else [e for e in map(int, a.epoch_list.split(",")) if e in saved]
        rows = {int(r["epoch"]): r for r in res[key].get("per_epoch", [])}
        for e in want:
            if key.startswith("jaxhet_"):
                z, maps = _jaxhet_epoch_maps(out, idx, e)
            else:
                z, maps = _cryodrgn_maps(out, idx, os.path.join(a.work, key), epoch=e)
            aucs = _fsc_auc_mean(maps, labels[idx], gt)
            rows[e] = dict(epoch=e, spearman_pc1_frame=_spearman_pc1(np.asarray(z, np.float64), labels),
                           fsc_auc_mean_100=float(np.mean(aucs)))
            print(f"{key} epoch {e:3d}: |rho| {rows[e]['spearman_pc1_frame']:.3f}  FSC-AUC "
                  f"{rows[e]['fsc_auc_mean_100']:.4f}", flush=True)
        res = json.load(open(RESULTS))  # re-read: other stages may have written meanwhile
        res[key]["per_epoch"] = [rows[e] for e in sorted(rows)]
        with open(RESULTS, "w") as f:
            json.dump(res, f, indent=1)


def stage_evaluate(a):
    labels = np.load(os.path.join(a.data, "labels.npy"))
    gt = _gt_maps(a.data)
    idx = np.sort(np.random.default_rng(0).choice(len(labels), 100, replace=False))
    res = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    table = []
    for key in sorted(k for k in res if k.startswith(("jaxhet_", "cryodrgn_"))):
        if a.only and key not in a.only.split(","):
            continue
        out = res[key]["out"]
        if key.startswith("jaxhet_"):
            z, maps = _jaxhet_maps(out, idx)
        else:
            z, maps = _cryodrgn_maps(out, idx, os.path.join(a.work, key))
        aucs = _fsc_auc_mean(maps, labels[idx], gt)
        rho = _spearman_pc1(np.asarray(z, np.float64), labels)
        res[key].update(spearman_pc1_frame=rho, fsc_auc_mean_100=float(np.mean(aucs)),
                        fsc_auc_std_100=float(np.std(aucs)))
        table.append((key, res[key]["epochs"], rho, np.mean(aucs), res[key]["images_per_s_median"],
                      res[key]["images_per_cpu_s"] or float("nan"), res[key]["peak_rss_MB"] or float("nan")))
    # reference: the ground-truth map of the neighbouring frame (how different are frames?)
    from jaxhet.analysis import map_fsc_auc
    res["reference_fsc_auc_gt_frame0_vs_frame97"] = map_fsc_auc(gt[0], gt[97])
    res["reference_fsc_auc_gt_frame_vs_frame_plus_10_mean"] = float(np.mean(
        [map_fsc_auc(gt[f], gt[min(97, f + 10)]) for f in range(0, 88, 8)]))
    res["protocol"] = dict(data=a.data, n_images=int(len(labels)), box=32, pixel_size=4.0, snr=0.05,
                           eval_images=idx.tolist()[:5] + ["..."], machine="2 shared CPU cores (other jobs running)")
    latest = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}  # others may have written meanwhile
    for k in [r[0] for r in table] + ["reference_fsc_auc_gt_frame0_vs_frame97",
                                       "reference_fsc_auc_gt_frame_vs_frame_plus_10_mean", "protocol"]:
        latest[k] = res[k]
    with open(RESULTS, "w") as f:
        json.dump(latest, f, indent=1)
    print(f"{'run':18s} {'epochs':>6s} {'|rho| PC1':>9s} {'FSC-AUC':>8s} {'img/s':>7s} {'img/CPU-s':>9s} {'RSS MB':>7s}")
    for row in table:
        print(f"{row[0]:18s} {row[1]:6d} {row[2]:9.3f} {row[3]:8.4f} {row[4] or float('nan'):7.1f} {row[5]:9.1f} "
              f"{row[6]:7.0f}")


def stage_tune(a):
    """Per-epoch metrics of one jaxhet configuration (in-process; for choosing settings).

    ``--set key=value,...`` overrides :class:`jaxhet.inference.VAEConfig` fields (protocol
    architecture otherwise); after every epoch: Spearman |rho| of PC1 and the mean FSC-AUC
    over the same 100 evaluation images as ``--stage evaluate``. Recorded under
    ``tune_<tag>`` in the results JSON.
    """
    import dataclasses
    from jaxhet import io as jio
    from jaxhet.cli._evalvol import maps_at_latents
    from jaxhet.inference import VAEConfig, train_vae
    labels = np.load(os.path.join(a.data, "labels.npy"))
    gt = _gt_maps(a.data)
    idx = np.sort(np.random.default_rng(0).choice(len(labels), 100, replace=False))
    table = jio.read_particles(f"{a.data}/particles.mrcs", poses=f"{a.data}/poses.pkl", ctf=f"{a.data}/ctf.pkl")
    data = jio.ParticleDataset(table)
    import ast
    over = {}
    for kv in filter(None, (a.set or "").split(",")):
        k, v = kv.split("=")
        try:
            over[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            over[k] = v
    cfg = VAEConfig(zdim=8, enc_dim=256, enc_layers=3, dec_dim=256, dec_layers=3, batch_size=a.batch_size,
                    seed=0, **over)
    out = os.path.join(a.work, f"tune_{a.tag}")
    rows = []
    ck = os.path.join(out, "checkpoint.npz")
    if os.path.exists(ck) and os.path.exists(RESULTS):  # resuming: keep the rows of finished epochs
        with np.load(ck) as f:
            done = int(json.loads(bytes(f["__meta__"]).decode())["epoch"])
        old = json.load(open(RESULTS)).get(f"tune_{a.tag}", {}).get("epochs", [])
        rows = [r for r in old if r["epoch"] <= done]
    for e in range(1, a.epochs + 1):
        if any(r["epoch"] == e for r in rows):
            continue  # evaluated when that epoch finished (the checkpoint is past it now)
        t0 = time.time()
        res = train_vae(data, out, dataclasses.replace(cfg, epochs=e), resume=e > 1 or
                        os.path.exists(os.path.join(out, "checkpoint.npz")), progress=False,
                        write_outputs=e == a.epochs)
        if len(res.history) < e:
            continue
        maps = maps_at_latents(res.decoder, res.latents[idx], int(data.image_size), float(data.pixel_size_in_angstroms))
        auc = float(np.mean(_fsc_auc_mean(maps, labels[idx], gt)))
        rho = _spearman_pc1(np.asarray(res.latents, np.float64), labels)
        h = res.history[e - 1]
        rows.append(dict(epoch=e, rho=rho, fsc_auc=auc, loss=h["loss"], nll=h["nll"], kl=h["kl"],
                         images_per_second=h["images_per_second"]))
        print(f"[{a.tag}] epoch {e}: rho {rho:.3f}  FSC-AUC {auc:.4f}  nll {h['nll']:.5g}  kl {h['kl']:.3g}  "
              f"{h['images_per_second']:.0f} img/s  ({time.time() - t0:.0f} s)", flush=True)
        _record(f"tune_{a.tag}", dict(overrides=over, out=out, epochs=rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=["simulate", "jaxhet", "cryodrgn", "finalize", "evaluate", "tune", "trajectory", "speed",
                                                    "cryodrgn_record"])
    p.add_argument("--data", default=os.path.join(ROOT, "experiments", "out", "vae_adk_d32"))
    p.add_argument("--work", default=os.path.join(ROOT, "experiments", "out", "vae_adk_runs"))
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tag", default=None)
    p.add_argument("--only", default=None, help="evaluate: only these runs (comma-separated keys)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="jaxhet stage: further `jaxhet train vae` options (last on the line)")
    p.add_argument("--speed-epochs", type=int, default=1, help="speed: epochs per tool (default 1)")
    p.add_argument("--epoch-list", default=None, help="trajectory: these epochs only (comma-separated)")
    p.add_argument("--set", default=None, help="tune: VAEConfig overrides key=value,... (e.g. window=0,beta=1)")
    a = p.parse_args()
    a.tag = a.tag or f"e{a.epochs}"
    os.makedirs(a.work, exist_ok=True)
    dict(simulate=stage_simulate, jaxhet=stage_jaxhet, cryodrgn=stage_cryodrgn, finalize=stage_finalize,
         evaluate=stage_evaluate, tune=stage_tune, trajectory=stage_trajectory, speed=stage_speed,
         cryodrgn_record=stage_cryodrgn_record)[a.stage](a)


if __name__ == "__main__":
    sys.exit(main())
