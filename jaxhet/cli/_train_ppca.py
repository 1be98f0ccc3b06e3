"""``jaxhet train ppca PARTICLES -o OUT --k K``: probabilistic PCA by EM (Tagare et al.
2015; cryoSPARC 3D variability) at the images' box, with a solvent mask, initialised by
the covariance estimator; optionally spectral volumes along the first diffusion
coordinate of the coefficients (``--spectral``).

Writes the files of ``jaxhet covariance`` (``OUT/latents.npy`` [N, K] posterior means in
input order, ``latents_cov.npy``, ``mean.mrc``, ``component_K.mrc``, ``mask.mrc``,
``movies/pcK/``, ``model.npz`` (``linear`` hyper-molecule), ``config.json``) plus
``OUT/checkpoint.npz`` (every EM iteration; ``--resume`` continues) and, with
``--spectral``, ``OUT/spectral/node_JJ.mrc``, ``OUT/spectral/u.npy`` (manifold coordinate
of each image in [0, 1]) and ``OUT/spectral/diffusion.npy``.

Discovered by :mod:`jaxhet.cli._train` (``TRAINER``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from jaxhet._errors import JaxhetInputError
from jaxhet.cli._train import Trainer

__all__ = ["TRAINER"]


def _arguments(p: argparse.ArgumentParser) -> None:
    from jaxhet.cli._covariance import add_linear_particle_arguments
    add_linear_particle_arguments(p)
    p.add_argument("--iters", type=int, default=12, help="EM iterations (at most)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="run all --iters EM steps (default: stop when the log evidence stops improving by "
                        "--tol nats per image and keep the best iterate)")
    p.add_argument("--tol", type=float, default=1e-3, help="early stopping: evidence improvement per image (nats)")
    p.add_argument("--cg-iter", type=int, default=6, help="PCG iterations per M-step")
    p.add_argument("--init", default="covariance", choices=["covariance", "random"],
                   help="initial components: covariance estimator or random maps")
    p.add_argument("--radius", type=float, default=None, help="covariance cut-off (cycles per box) for --init")
    p.add_argument("--free-mean", action="store_true",
                   help="also refit X_0 in the M-steps (default: keep the CG Wiener mean)")
    p.add_argument("--spectral", action="store_true", help="also compute spectral volumes along the manifold")
    p.add_argument("--nodes", type=int, default=15, help="spectral volumes: number of nodes")
    p.add_argument("--bandwidth", type=float, default=0.2, help="spectral volumes: kernel width (fraction of images)")
    p.add_argument("--refine", type=int, default=0, help="spectral volumes: likelihood refinements of the coordinate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")


def _run(args) -> int:
    import time

    from jaxhet import io as jio
    from jaxhet.cli._covariance import check_out, open_linear_data, write_linear_outputs
    from jaxhet.inference import (default_mask, estimate_covariance, fit_ppca, noise_psd_from_residuals,
                                  solve_mean, spectral_volumes)

    if args.iters < 1:
        raise JaxhetInputError(f"--iters must be >= 1, got {args.iters}")
    check_out(args.out, args.force, args.resume)
    ckpt = os.path.join(args.out, "checkpoint.npz")
    if os.path.exists(ckpt) and not args.resume:  # a stale checkpoint of an earlier run
        os.remove(ckpt)
    if args.resume and not os.path.exists(ckpt):
        raise JaxhetInputError(f"{ckpt}: nothing to resume")
    t0 = time.time()
    ds, data, mask = open_linear_data(args)
    print(f"{data.n_images} particles, box {data.box_size}, {data.pixel_size:.3g} A/px")
    mean = init = psd = inv_tau2 = None
    if not args.resume:
        mres = solve_mean(data)
        mean, inv_tau2 = mres.volume, mres.inv_tau2
        print(f"mean: {mres.cg.n_iter} CG iterations, relative residual {mres.cg.residual_norms[-1]:.2e}")
        if mask is None:
            mask = default_mask(mean, data.pixel_size)
        psd = noise_psd_from_residuals(data, mean)
        if args.init == "covariance":
            cov = estimate_covariance(data, mean, psd, n_components=args.k, mask=mask, radius=args.radius)
            init = cov.components
            print(f"covariance init: eigenvalues {np.array2string(cov.eigenvalues, precision=3)}")
        else:
            init = np.zeros((0,) + mean.shape, np.float32)
    res = fit_ppca(data, args.k, mean_volume=mean, mean_inv_tau2=inv_tau2, init_components=init, mask=mask, noise_psd=psd,
                   n_iter=args.iters, cg_iter=args.cg_iter, seed=args.seed, fix_mean=not args.free_mean,
                   progress=True, checkpoint=ckpt, early_stop=not args.no_early_stop, tol=args.tol)
    print(f"PPCA: kept the volumes after {res.best_iteration} M-steps (best log evidence)"
          f"{'; stopped early' if res.stopped_early else ''}")
    extra = dict(method="ppca", log_evidence=[float(x) for x in res.log_evidence], best_iteration=res.best_iteration,
                 stopped_early=res.stopped_early,
                 noise_psd=np.asarray(res.noise_psd).tolist(), seconds_ppca=res.seconds)
    if args.spectral:
        sv = spectral_volumes(ds, res.mu, n_nodes=args.nodes, bandwidth=args.bandwidth, mask=res.mask,
                              batch_size=args.batch_size, ctf_sign=args.ctf_sign, refine_iter=args.refine,
                              prepared=data, noise_psd=res.noise_psd, progress=True)
        sd = os.path.join(args.out, "spectral")
        os.makedirs(sd, exist_ok=True)
        for jn, v in enumerate(sv.node_maps):
            jio.write_mrc(os.path.join(sd, f"node_{jn:02d}.mrc"), v, data.pixel_size, overwrite=True)
        np.save(os.path.join(sd, "u.npy"), sv.u)
        np.save(os.path.join(sd, "nodes.npy"), sv.nodes)
        np.save(os.path.join(sd, "diffusion.npy"), sv.diffusion.coords)
        extra["spectral"] = dict(nodes=sv.nodes.tolist(), bandwidth=sv.bandwidth,
                                 resolution_0143=sv.resolution_0143.tolist(),
                                 diffusion_eigenvalues=sv.diffusion.eigenvalues.tolist())
    extra["seconds"] = time.time() - t0
    write_linear_outputs(args.out, res.volumes, res.mu, res.cov, res.mask, data.pixel_size, args, ds, extra=extra,
                         movie_frames=args.movie_frames)
    print(f"wrote {args.out}/latents.npy ({res.mu.shape[0]} x {res.mu.shape[1]}), mean.mrc, component_*.mrc, "
          f"movies/, model.npz, config.json{', spectral/' if args.spectral else ''} in {time.time() - t0:.0f} s")
    return 0


TRAINER = Trainer("ppca", "probabilistic PCA by EM (principal volumes + per-image coefficients), known poses",
                  _arguments, _run)
