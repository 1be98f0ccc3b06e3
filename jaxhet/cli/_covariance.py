"""``jaxhet covariance PARTICLES -o OUT``: mean and covariance of the conformations
directly from the images (known poses), principal volumes and per-image coefficients.

Pipeline: mean map by conjugate gradients (:func:`jaxhet.inference.solve_mean`), noise
spectrum from its residuals, least-squares covariance on a low-resolution grid
(:func:`jaxhet.inference.estimate_covariance`), top-K principal volumes, and the posterior
of each image's coefficients (:func:`jaxhet.inference.posterior_coefficients`).

Writes (shared with ``jaxhet train ppca``, see :func:`write_linear_outputs`):
``OUT/latents.npy`` [N, K] posterior means (input particle order), ``OUT/latents_cov.npy``
[N, K, K], ``OUT/mean.mrc``, ``OUT/component_K.mrc`` (principal volumes X_k), ``OUT/mask.mrc``,
``OUT/movies/pcK/frame_TT.mrc`` (V(t) = X_0 + t X_k, t over the 5-95 % range of the
coefficient), ``OUT/model.npz`` (the registered ``linear`` hyper-molecule, for
``jaxhet eval-vol`` / ``jaxhet analyze``), ``OUT/config.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from jaxhet._errors import JaxhetInputError

__all__ = ["register", "run", "add_linear_particle_arguments", "open_linear_data", "write_linear_outputs",
           "LINEAR_FILES"]

LINEAR_FILES = ("latents.npy", "latents_cov.npy", "mean.mrc", "mask.mrc", "model.npz", "config.json", "movies")


def add_linear_particle_arguments(p: argparse.ArgumentParser) -> None:
    """Particle options (as ``jaxhet train``) and the options shared by the linear methods."""
    p.add_argument("particles", help="particles: .star (RELION), .cs (cryoSPARC), or .mrcs/.txt with --poses/--ctf")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--poses", help="cryoDRGN poses .pkl (replaces the file's poses)")
    p.add_argument("--ctf", help="cryoDRGN ctf .pkl (replaces the file's CTF)")
    p.add_argument("--datadir", help="folder holding the stacks named in a STAR/.cs file")
    p.add_argument("--downsample", type=int, default=None, metavar="D", help="work on images Fourier-cropped to box D")
    p.add_argument("--k", type=int, default=4, help="number of principal volumes K")
    p.add_argument("--mask", default=None, help="solvent mask .mrc (default: automatic from the mean map)")
    p.add_argument("--ctf-sign", default="relion", choices=["relion", "cryodrgn"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--movie-frames", type=int, default=10, help="maps per component movie")
    p.add_argument("--no-cache", action="store_true", help="stream images from disk every pass (large data sets)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")


def open_linear_data(args):
    """(ParticleDataset, PreparedImages, mask or None) of the particle arguments."""
    from jaxhet import io as jio
    from jaxhet.inference import prepare_images
    if args.k < 1:
        raise JaxhetInputError(f"--k must be >= 1, got {args.k}")
    table = jio.read_particles(args.particles, poses=args.poses, ctf=args.ctf, datadir=args.datadir)
    if not getattr(table, "has_poses", True):
        raise JaxhetInputError(f"{args.particles}: no poses (give --poses)")
    ds = jio.ParticleDataset(table, downsample_to=args.downsample)
    data = prepare_images(ds, batch_size=args.batch_size, ctf_sign=args.ctf_sign, cache=not args.no_cache)
    mask = None
    if args.mask:
        mask, _ = jio.read_mrc(args.mask)
        if mask.shape != (data.box_size,) * 3:
            raise JaxhetInputError(f"{args.mask}: mask is {mask.shape}, images are {data.box_size} px")
    return ds, data, mask


def check_out(out: str, force: bool, resume: bool = False) -> None:
    """Refuse to overwrite a finished output folder silently."""
    if os.path.exists(os.path.join(out, "latents.npy")) and not (force or resume):
        raise JaxhetInputError(f"{out}: already holds results (use --force to overwrite)")
    os.makedirs(out, exist_ok=True)


def write_linear_outputs(out: str, volumes, mu, cov, mask, pixel_size: float, args, ds, extra: dict | None = None,
                         movie_frames: int = 10) -> list[str]:
    """Write latents, volumes, movies, the ``linear`` model and config.json (see module doc).

    Args:
        out: folder. volumes: [K+1, D, D, D] (X_0, X_1..X_K). mu: [N, K]; cov: [N, K, K].
        mask: [D, D, D] solvent mask. pixel_size: of the volumes. args: parsed CLI arguments
        (particle file, poses, ctf, datadir, ctf_sign). ds: the ParticleDataset.
        extra: more entries for config.json.

    Returns:
        the paths written.
    """
    from jaxhet import io as jio
    from jaxhet.inference import linear_movie
    from jaxhet.models import LinearModel, save_model

    vols = np.asarray(volumes, np.float32)
    K = vols.shape[0] - 1
    j = lambda *p: os.path.join(out, *p)  # noqa: E731
    written = []
    np.save(j("latents.npy"), np.asarray(mu, np.float32))
    np.save(j("latents_cov.npy"), np.asarray(cov, np.float32))
    written += [j("latents.npy"), j("latents_cov.npy")]
    jio.write_mrc(j("mean.mrc"), vols[0], pixel_size, overwrite=True)
    jio.write_mrc(j("mask.mrc"), np.asarray(mask, np.float32), pixel_size, overwrite=True)
    written += [j("mean.mrc"), j("mask.mrc")]
    for k in range(K):
        jio.write_mrc(j(f"component_{k + 1}.mrc"), vols[k + 1], pixel_size, overwrite=True)
        written.append(j(f"component_{k + 1}.mrc"))
        lo, hi = np.percentile(np.asarray(mu)[:, k], [5, 95])
        ts = np.linspace(lo, hi, int(movie_frames))
        os.makedirs(j("movies", f"pc{k + 1}"), exist_ok=True)
        for i, v in enumerate(linear_movie(vols, k + 1, ts)):
            jio.write_mrc(j("movies", f"pc{k + 1}", f"frame_{i:02d}.mrc"), v, pixel_size, overwrite=True)
        with open(j("movies", f"pc{k + 1}", "values.json"), "w") as f:
            json.dump([float(t) for t in ts], f)
    model = LinearModel.from_volumes(vols, pixel_size)
    if os.path.exists(j("model.npz")):
        os.remove(j("model.npz"))
    save_model(j("model.npz"), model)
    written.append(j("model.npz"))
    conf = dict(model_file="model.npz", latents_file="latents.npy",
                particles=os.path.abspath(args.particles),
                poses=args.poses and os.path.abspath(args.poses), ctf=args.ctf and os.path.abspath(args.ctf),
                datadir=args.datadir and os.path.abspath(args.datadir),
                data_box_size=int(ds.box), data_pixel_size=float(ds.original_pixel_size),
                box_size=int(vols.shape[-1]), pixel_size=float(pixel_size), latent_dim=int(K),
                config=dict(ctf_sign=args.ctf_sign, k=int(K), downsample=args.downsample))
    conf.update(extra or {})
    with open(j("config.json"), "w") as f:
        json.dump(conf, f, indent=1)
    written.append(j("config.json"))
    return written


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "covariance", help="mean, covariance and principal volumes directly from images (known poses)",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_linear_particle_arguments(p)
    p.add_argument("--radius", type=float, default=None,
                   help="Fourier cut-off of the covariance in cycles per box (default min(D/2-1, 6))")
    p.add_argument("--ridge", type=float, default=1e-2, help="entrywise Tikhonov weight (relative)")
    p.add_argument("--cg-iter", type=int, default=10, help="PCG iterations of the covariance solve")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from jaxhet.inference import (default_mask, estimate_covariance, noise_psd_from_residuals,
                                  posterior_coefficients, solve_mean)

    check_out(args.out, args.force)
    t0 = time.time()
    ds, data, mask = open_linear_data(args)
    print(f"{data.n_images} particles, box {data.box_size}, {data.pixel_size:.3g} A/px")
    mres = solve_mean(data)
    print(f"mean: {mres.cg.n_iter} CG iterations, relative residual {mres.cg.residual_norms[-1]:.2e}")
    if mask is None:
        mask = default_mask(mres.volume, data.pixel_size)
    psd = noise_psd_from_residuals(data, mres.volume)
    cov = estimate_covariance(data, mres.volume, psd, n_components=args.k, mask=mask, radius=args.radius,
                              ridge=args.ridge, max_iter=args.cg_iter)
    print(f"covariance: radius {cov.radius:g} cycles/box, {int(cov.coarse_mask.sum())} coarse voxels, "
          f"{cov.cg.n_iter} PCG iterations; eigenvalues {np.array2string(cov.eigenvalues, precision=3)}")
    vols = np.concatenate([(mres.volume * mask)[None], cov.components], 0)
    mu, cv, _ = posterior_coefficients(data, vols, psd)
    paths = write_linear_outputs(args.out, vols, mu, cv, mask, data.pixel_size, args, ds, movie_frames=args.movie_frames,
                                 extra=dict(method="covariance", eigenvalues=cov.eigenvalues.tolist(),
                                            radius=cov.radius, noise_psd=np.asarray(psd).tolist(),
                                            seconds=time.time() - t0))
    print(f"wrote {args.out}/latents.npy ({mu.shape[0]} x {mu.shape[1]}), mean.mrc, component_*.mrc, movies/, "
          f"model.npz, config.json ({len(paths)} files) in {time.time() - t0:.0f} s")
    return 0

