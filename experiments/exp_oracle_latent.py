"""How well can ANY method order the AdK images by frame? A ground-truth oracle.

Every latent-variable method (VAE, PPCA, diffusion maps...) maps an image to a latent; the
best possible 1-D ordering, given only the image, is the posterior of the frame under the
TRUE forward model (true maps of all 98 frames, true pose, true CTF, true noise level):

    p(f | y) ∝ exp(-||y - C_f(y's pose)||^2 / (2 sigma^2)),   f = 0..97 (uniform prior).

We report the Spearman |rho| between the posterior-mean frame and the true frame (the
ceiling for issue 6/4's "first latent PC vs true frame" metric on this dataset), the MAP
frame's accuracy within ±k frames, and the posterior standard deviation in frames.

    python experiments/exp_oracle_latent.py [--data experiments/out/vae_adk_d32]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "experiments", "out", "vae_adk_d32"))
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "oracle_latent.json"))
    a = p.parse_args()

    from scipy.stats import spearmanr

    from jaxhet.core import CTFParams
    from jaxhet.io import read_mrc, read_particles
    from jaxhet.sim._simulate import render_clean_images

    t0 = time.time()
    conf = json.load(open(os.path.join(a.data, "sim_config.json")))
    sigma = conf["noise_sigma"]
    table = read_particles(os.path.join(a.data, "particles.star"))
    labels = np.load(os.path.join(a.data, "labels.npy"))
    images = read_mrc(os.path.join(a.data, "particles.mrcs"))[0].astype(np.float32)
    files = sorted(glob.glob(os.path.join(a.data, "gt", "frame_*.mrc")))
    frames = [int(re.search(r"frame_(\d+)", f).group(1)) for f in files]
    ctf = CTFParams(*[np.asarray(x) for x in table.ctf_params()])
    n, F = len(images), len(files)
    loglik = np.empty((n, F), np.float64)
    for j, f in enumerate(files):
        clean = render_clean_images(read_mrc(f)[0], np.asarray(table.euler_in_degrees),
                                    np.asarray(table.origin_in_pixels), ctf, conf["pixel_size"])
        loglik[:, j] = -((images - clean) ** 2).reshape(n, -1).sum(1) / (2 * sigma ** 2)
        if j % 10 == 0:
            print(f"frame {j}/{F}  {time.time() - t0:.0f}s", flush=True)
    post = np.exp(loglik - loglik.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    fr = np.asarray(frames, np.float64)
    mean = post @ fr
    sd = np.sqrt(np.maximum(post @ fr ** 2 - mean ** 2, 0))
    mapf = fr[np.argmax(post, 1)]
    rho_mean = abs(float(spearmanr(mean, labels).statistic))
    rho_map = abs(float(spearmanr(mapf, labels).statistic))
    res = dict(data=a.data, n_images=n, snr=conf["snr"], box=conf["box_size"], pixel_size=conf["pixel_size"],
               spearman_posterior_mean_frame=rho_mean, spearman_map_frame=rho_map,
               median_posterior_sd_frames=float(np.median(sd)),
               map_within_5_frames=float(np.mean(np.abs(mapf - labels) <= 5)),
               map_within_10_frames=float(np.mean(np.abs(mapf - labels) <= 10)),
               wall_s=time.time() - t0)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    allres = json.load(open(a.out)) if os.path.exists(a.out) else {}
    allres[os.path.basename(a.data.rstrip("/"))] = res
    json.dump(allres, open(a.out, "w"), indent=1)
    print(f"{'oracle (true maps, poses, CTF, sigma)':40s}")
    for k, v in res.items():
        print(f"  {k:34s} {v}")


if __name__ == "__main__":
    main()
