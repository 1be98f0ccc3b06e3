"""``jaxhet refine``: gold-standard EM refinement of poses (and map) from rough poses or a map.

Writes OUT/refined.star (estimated pose of every particle, with RELION's
rlnMaxValueProbDistribution and the posterior angular spread in rlnjaxhetAngularSpread,
degrees), OUT/map.mrc, OUT/map_half1.mrc, OUT/map_half2.mrc, OUT/map_mask.mrc, fsc.txt,
fsc.png, sections.png and history.json. After every iteration OUT/checkpoint.npz holds
the poses and half maps; ``--resume`` continues from it.

The poses and maps written are those of the last iteration at the best gold-standard
resolution (1% tolerance); the run stops after ``--patience`` iterations worse than that. A resumed
run chooses among the iterations it runs after the checkpoint's (which it starts from).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from jaxhet.cli._reconstruct import (add_particle_args, check_outputs, load_dataset, map_output_paths,
                                     write_reconstruction)


def write_pose_star(path: str, table, dataset, rotations, origin_in_pixels, max_probability, angular_spread,
                    overwrite: bool) -> None:
    """Write the table with new poses (origins rescaled to the original pixels) and the
    posterior columns rlnMaxValueProbDistribution and rlnjaxhetAngularSpread."""
    import jax.numpy as jnp
    import starfile
    from jaxhet.core import matrix_to_euler
    from jaxhet.io import write_star

    t = table.copy()
    t.euler_in_degrees = np.asarray(matrix_to_euler(jnp.asarray(rotations)), np.float64)
    t.origin_in_pixels = np.asarray(origin_in_pixels, np.float64) / dataset.scale
    t.has_poses = True
    write_star(path, t, overwrite=overwrite)
    blocks = starfile.read(path, always_dict=True)
    key = "particles" if "particles" in blocks else [k for k in blocks if k != "optics"][-1]
    df = blocks[key]
    if len(df) != len(t):
        raise RuntimeError(f"{path}: {len(df)} rows written for {len(t)} particles")
    df["rlnMaxValueProbDistribution"] = np.asarray(max_probability, np.float64)
    df["rlnjaxhetAngularSpread"] = np.asarray(angular_spread, np.float64)
    blocks[key] = df
    starfile.write(blocks, path, overwrite=True)


def register(sub) -> None:
    p = sub.add_parser(
        "refine", help="EM refinement of poses and map (local or global search, gold standard)",
        description="Expectation-maximisation over rotations x shifts with a Gaussian noise model: each half set "
                    "is aligned to its own half map, comparing frequencies below the current resolution; "
                    "coarse-to-fine local searches around the input poses (or global searches with --global). "
                    "Writes OUT/refined.star (with rlnMaxValueProbDistribution and rlnjaxhetAngularSpread), "
                    "maps, FSC and history.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_particle_args(p)
    p.set_defaults(batch_size=128)
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--initial-map", default=None, help="starting map .mrc (default: reconstruct from the input poses)")
    p.add_argument("--initial-resolution", type=float, default=20.0, help="low-pass of the start and first limit (A)")
    p.add_argument("--max-resolution", type=float, default=None, help="never compare beyond this resolution (A)")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--initial-error", type=float, default=15.0,
                   help="expected pose error (deg): the first local search covers ~1.4x this")
    p.add_argument("--global", dest="global_steps", type=int, default=0, metavar="K",
                   help="run K global searches (SO(3) grid, 7.5 deg) before the local ones")
    p.add_argument("--shift-range", type=float, default=2.0, help="translation search radius (px) of the first iteration")
    p.add_argument("--m-step", choices=["best", "topk"], default="best")
    p.add_argument("--pose-estimate", choices=["near", "mean"], default="near",
                   help="local searches' pose: posterior mean next to the best grid pose, or over the whole window")
    p.add_argument("--snr-from", choices=["unmasked", "masked"], default="unmasked",
                   help="half-map FSC that sets the references' Wiener filter (unmasked: RELION's default)")
    p.add_argument("--leave-out-folds", type=int, default=0, metavar="K",
                   help="align each image to its half map reconstructed without its fold (1/K of the half): "
                        "no image is scored against a map containing itself (0: off, RELION's practice)")
    p.add_argument("--patience", type=int, default=2,
                   help="stop when the resolution has been worse than the best for this many iterations (0: run "
                        "them all); the last iteration at the best resolution (1%% tolerance) is written either way")
    p.add_argument("--mask-radius", type=float, default=None, help="reference mask radius (px; default 0.45 D)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxhet._errors import JaxhetInputError
    from jaxhet.inference import SearchStage, default_local_schedule, refine
    from jaxhet.io import read_mrc

    if args.iterations < 1 and args.global_steps < 1:
        raise JaxhetInputError("--iterations must be >= 1")
    if args.patience < 0:
        raise JaxhetInputError("--patience must be >= 0 (0: run every iteration)")
    if args.leave_out_folds == 1 or args.leave_out_folds < 0:
        raise JaxhetInputError("--leave-out-folds must be 0 (off) or at least 2")
    out = os.path.abspath(args.out)
    paths = map_output_paths(os.path.join(out, "map.mrc"))
    star = os.path.join(out, "refined.star")
    hist_path = os.path.join(out, "history.json")
    ckpt = os.path.join(out, "checkpoint.npz")
    if not args.resume:
        check_outputs([star, hist_path, ckpt, *paths.values()], args.force)
    elif not os.path.exists(ckpt):
        raise JaxhetInputError(f"{ckpt}: no checkpoint to resume from")
    table, ds = load_dataset(args, need_poses=args.initial_map is None and args.global_steps == 0)
    D = ds.image_size
    schedule = [SearchStage("global", 7.5, 0.0, args.shift_range, 1.0) for _ in range(args.global_steps)]
    schedule += default_local_schedule(args.initial_error, args.iterations, args.shift_range)
    init_vol = None
    rotations = origins = None
    init_res = args.initial_resolution
    start = 0
    history = []
    if args.resume:
        ck = np.load(ckpt)
        start = int(ck["iteration"])
        rotations, origins, init_vol = ck["rotations"], ck["origin_in_pixels"], ck["half_maps"]
        if args.leave_out_folds:  # the fold accumulators are rebuilt from the checkpoint's poses
            init_vol = None
        init_res = float(ck["resolution"])
        if os.path.exists(hist_path):
            with open(hist_path) as fh:
                history = json.load(fh)
        if start >= len(schedule):
            raise JaxhetInputError(f"{ckpt}: all {len(schedule)} iterations already done")
        print(f"resuming after iteration {start}")
    elif args.initial_map:
        init_vol, _ = read_mrc(args.initial_map)
        if init_vol.shape != (D, D, D):
            raise JaxhetInputError(f"{args.initial_map}: map shape {init_vol.shape} does not match box {D}")
    if rotations is None and args.global_steps > 0:
        rotations = np.tile(np.eye(3, dtype=np.float32), (len(ds), 1, 1))
        origins = (table.origin_in_pixels * ds.scale).astype(np.float32)
    if rotations is None:
        rotations = table.rotation_matrices()
        origins = (table.origin_in_pixels * ds.scale).astype(np.float32)
    if not np.isfinite(rotations).all():
        raise JaxhetInputError(f"{args.particles}: some particles have no poses")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    def on_iteration(it, info, rot, org, half_maps):
        info = dict(info, iteration=start + it)
        history.append(info)
        print(f"iteration {start + it}: {info['kind']} step {info['angular_step']:.2f} deg, "
              f"resolution {info['resolution_0143']:.2f} A, mean max prob {info['mean_max_probability']:.3f}, "
              f"median spread {info['median_angular_spread']:.2f} deg ({info['seconds']:.0f} s)", flush=True)
        if "stopped" in info:
            print(f"stopping: {info['stopped']}", flush=True)
        tmp = ckpt + ".tmp.npz"
        np.savez(tmp, iteration=start + it, rotations=rot, origin_in_pixels=org, half_maps=half_maps,
                 resolution=info["resolution_0143"])
        os.replace(tmp, ckpt)
        with open(hist_path, "w") as fh:
            json.dump(history, fh, indent=1)

    res = refine(ds, initial_volume=init_vol, rotations=rotations, origin_in_pixels=origins,
                 schedule=schedule[start:], initial_resolution_in_angstroms=init_res,
                 max_resolution_in_angstroms=args.max_resolution, mask_radius_in_pixels=args.mask_radius,
                 m_step=args.m_step, batch_size=args.batch_size, seed=args.seed, progress=True,
                 callback=on_iteration, pose_estimate=args.pose_estimate, leave_out_folds=args.leave_out_folds,
                 patience=args.patience, snr_from=args.snr_from)
    rec = res.reconstruction
    write_reconstruction(rec, paths, True, title="refined map")
    write_pose_star(star, table, ds, res.rotations, res.origin_in_pixels, res.max_probability,
                    res.angular_spread_in_degrees, overwrite=True)
    best = start + res.history[-1]["best_iteration"]
    print(f"refined {len(ds)} particles in {time.time() - t0:.0f} s: resolution {rec.resolution_0143:.2f} A (0.143) "
          f"at iteration {best} (the best; its poses and map are written); "
          f"wrote {star}, {paths['map']}, half maps, fsc, {hist_path}")
    return 0
