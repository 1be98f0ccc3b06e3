"""``jaxhet abinitio``: a map and poses from particles without poses.

Minibatch stochastic EM with global pose searches at growing resolution (cryoSPARC-style),
then a global assignment of every particle and a few local gold-standard refinement
iterations. Writes OUT/abinitio_sgd.mrc (the minibatch phase's map), OUT/map.mrc,
OUT/map_half1.mrc, OUT/map_half2.mrc, OUT/map_mask.mrc, fsc.txt, fsc.png, sections.png,
OUT/abinitio.star (poses, rlnMaxValueProbDistribution, rlnjaxhetAngularSpread) and
history.json. OUT/sgd_checkpoint.npz is updated after every minibatch; ``--resume``
continues the minibatch phase from it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from jaxhet.cli._reconstruct import (add_particle_args, check_outputs, load_dataset, map_output_paths,
                                     write_reconstruction)


def register(sub) -> None:
    p = sub.add_parser(
        "abinitio", help="ab initio map and poses (minibatch stochastic EM, then refinement)",
        description="Ab initio reconstruction without poses: minibatches of particles are searched over a global "
                    "SO(3) grid against the current map at a resolution that grows from --initial-resolution to "
                    "--final-resolution; the posterior-weighted backprojections update running averages of the "
                    "map. Then every particle is assigned by a global search and the result is refined locally "
                    "(gold standard). The map's hand is arbitrary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_particle_args(p)
    p.set_defaults(batch_size=128)
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--iterations", type=int, default=60, help="minibatches of the stochastic phase")
    p.add_argument("--minibatch", type=int, default=300, help="particles per minibatch")
    p.add_argument("--initial-resolution", type=float, default=30.0, help="A")
    p.add_argument("--final-resolution", type=float, default=12.0, help="A (end of the minibatch phase)")
    p.add_argument("--shift-range", type=float, default=0.0, help="translation search radius (px) around the input origins")
    p.add_argument("--assign-step", type=float, default=7.5, help="SO(3) grid (deg) of the assignment of all particles")
    p.add_argument("--refine-iterations", type=int, default=3, help="local refinement iterations (0: none)")
    p.add_argument("--resume", action="store_true", help="continue the minibatch phase from OUT/sgd_checkpoint.npz")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxhet._errors import JaxhetInputError
    from jaxhet.cli._refine import write_pose_star
    from jaxhet.inference import SearchStage, abinitio_sgd, assign_poses, refine
    from jaxhet.io import write_mrc

    if args.iterations < 1 or args.minibatch < 1:
        raise JaxhetInputError("--iterations and --minibatch must be >= 1")
    if not 0 < args.final_resolution <= args.initial_resolution:
        raise JaxhetInputError("need 0 < --final-resolution <= --initial-resolution")
    out = os.path.abspath(args.out)
    paths = map_output_paths(os.path.join(out, "map.mrc"))
    sgd_map = os.path.join(out, "abinitio_sgd.mrc")
    star = os.path.join(out, "abinitio.star")
    hist_path = os.path.join(out, "history.json")
    ckpt = os.path.join(out, "sgd_checkpoint.npz")
    if not args.resume:
        check_outputs([sgd_map, star, hist_path, ckpt, *paths.values()], args.force)
    elif not os.path.exists(ckpt):
        raise JaxhetInputError(f"{ckpt}: no checkpoint to resume from")
    table, ds = load_dataset(args, need_poses=False)
    os.makedirs(out, exist_ok=True)
    history = {"sgd": [], "refine": []}
    start, init_vol = 0, None
    if args.resume:
        ck = np.load(ckpt)
        start, init_vol = int(ck["iteration"]), ck["volume"]
        if os.path.exists(hist_path):
            with open(hist_path) as fh:
                history = json.load(fh)
        print(f"resuming the minibatch phase after iteration {start}")
    t0 = time.time()

    def on_batch(it, info, vol):
        history["sgd"].append(info)
        tmp = ckpt + ".tmp.npz"
        np.savez(tmp, iteration=it, volume=vol)
        os.replace(tmp, ckpt)
        with open(hist_path, "w") as fh:
            json.dump(history, fh, indent=1)

    vol = init_vol
    if start < args.iterations:
        vol, _ = abinitio_sgd(ds, n_iterations=args.iterations, minibatch_size=args.minibatch,
                              initial_resolution_in_angstroms=args.initial_resolution,
                              final_resolution_in_angstroms=args.final_resolution, shift_range=args.shift_range,
                              seed=args.seed, progress=True, callback=on_batch, initial_volume=init_vol,
                              start_iteration=start)
    write_mrc(sgd_map, vol, ds.pixel_size_in_angstroms, overwrite=True)
    print(f"minibatch phase done ({time.time() - t0:.0f} s); wrote {sgd_map}", flush=True)
    R, O, P = assign_poses(ds, vol, resolution_in_angstroms=args.final_resolution, step_in_degrees=args.assign_step,
                           shift_range=args.shift_range, batch_size=args.batch_size, progress=True)
    spread = np.full(len(ds), np.nan)
    if args.refine_iterations > 0:
        s = args.shift_range / 2
        sched = [SearchStage("local", args.assign_step / 3, args.assign_step * 0.8, s, 1.0)]
        while len(sched) < args.refine_iterations:
            prev = sched[-1]
            sched.append(SearchStage("local", prev.angular_step / 2, prev.angular_range / 2,
                                     prev.shift_range / 2, max(prev.shift_step / 2, 0.25)))

        def on_iter(it, info, *rest):
            history["refine"].append(info)
            print(f"refine iteration {it}: resolution {info['resolution_0143']:.2f} A", flush=True)
            with open(hist_path, "w") as fh:
                json.dump(history, fh, indent=1)

        res = refine(ds, initial_volume=vol, rotations=R, origin_in_pixels=O, schedule=sched,
                     initial_resolution_in_angstroms=args.final_resolution, batch_size=args.batch_size,
                     seed=args.seed, progress=True, callback=on_iter)
        R, O, P, spread, rec = res.rotations, res.origin_in_pixels, res.max_probability, \
            res.angular_spread_in_degrees, res.reconstruction
    else:
        from jaxhet.inference import init_reconstruction, accumulate_batches, finalize_reconstruction, ImageBatch

        def with_poses():
            for b in ds.batches(args.batch_size):
                yield ImageBatch(b.images, R[b.indices], O[b.indices], b.ctf, b.indices, b.pixel_size_in_angstroms)

        st, pix = accumulate_batches(init_reconstruction(ds.image_size), with_poses(), batch_size=args.batch_size,
                                     seed=args.seed)
        rec = finalize_reconstruction(st, pix)
    write_reconstruction(rec, paths, True, title="ab initio map")
    write_pose_star(star, table, ds, R, O, P, spread, overwrite=True)
    with open(hist_path, "w") as fh:
        json.dump(history, fh, indent=1)
    print(f"ab initio done in {time.time() - t0:.0f} s: resolution {rec.resolution_0143:.2f} A (0.143, masked); "
          f"wrote {paths['map']}, {star}, {sgd_map}")
    return 0
