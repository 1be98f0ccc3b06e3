"""``jaxhet multibody PARTICLES --masks m1.mrc m2.mrc ... -o OUT``: multi-body refinement
and the principal components of the body motions (RELION's multi-body refinement and
relion_flex_analyse).

Writes into OUT: ``latents.npy`` ([N, C] each image's coordinates on the first C
principal components of its stacked body motions, input particle order),
``body_motions.npy`` ([N, B, 6] per image and body: rotation vector in degrees about the
body's centre of mass, then translation in A, relative to the consensus pose),
``consensus.mrc``, ``body_1.mrc`` ... (per-body reconstructions, masked),
``movies/component_J_frame_FF.mrc`` (maps along each component, 5th to 95th percentile)
with ``movies/component_J.png``, ``pca.json`` (explained variance, components),
``multibody_model.npz`` (the :class:`jaxhet.models.MultiBodyModel`, for ``eval-vol``),
``multibody.json`` and ``checkpoint.npz`` (resumed if the run is interrupted).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

OUTPUTS = ("latents.npy", "body_motions.npy", "consensus.mrc", "pca.json", "multibody_model.npz", "multibody.json",
           "movies")


def register(sub) -> None:
    from jaxhet.cli._train import add_particle_arguments

    p = sub.add_parser(
        "multibody", help="multi-body refinement: per-image rigid motions of masked bodies, and their PCA",
        description="Multi-body refinement (Nakane et al. 2018): the consensus map is split into bodies by soft "
                    "masks; each image's body motions are refined against the image minus the other bodies "
                    "(local search + Gauss-Newton), the bodies are reconstructed, and the motions are analysed "
                    "by PCA with map movies along the components (as relion_flex_analyse). Needs consensus poses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_particle_arguments(p)
    p.add_argument("--masks", nargs="+", required=True, metavar="MASK.mrc", help="one soft mask per body (>= 2)")
    p.add_argument("--consensus", default=None, metavar="MAP.mrc",
                   help="consensus map (default: reconstructed from the particles' poses)")
    p.add_argument("--iters", type=int, default=5, help="multi-body iterations")
    p.add_argument("--sigma-rot", type=float, default=10.0, help="prior sd of body rotations (deg)")
    p.add_argument("--sigma-trans", type=float, default=4.0, help="prior sd of body translations (A)")
    p.add_argument("--local-search", type=float, default=10.0, metavar="DEG",
                   help="rotation grid search range around the current motion (0: Gauss-Newton only)")
    p.add_argument("--local-step", type=float, default=5.0, metavar="DEG")
    p.add_argument("--gn-steps", type=int, default=5, help="Gauss-Newton steps per body and sweep")
    p.add_argument("--initial-resolution", type=float, default=20.0, metavar="A")
    p.add_argument("--components", type=int, default=3, help="principal components written to latents.npy")
    p.add_argument("--movie-frames", type=int, default=10, help="maps per component movie (0: none)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs in OUT")
    p.set_defaults(func=run)


def fit_mask(path: str, box: int, pixel_size: float) -> np.ndarray:
    """Read a mask and bring it onto the particles' grid (same box, or same physical size
    at another sampling: linear resampling); values clipped to [0, 1]."""
    from scipy import ndimage

    from jaxhet._errors import JaxhetInputError
    from jaxhet.io import read_mrc

    m, vox = read_mrc(path)
    m = np.asarray(m, np.float32)
    if m.ndim != 3 or len(set(m.shape)) != 1:
        raise JaxhetInputError(f"{path}: a mask must be a cubic 3D map, got shape {m.shape}")
    n = m.shape[0]
    if n != box:
        if not vox or abs(n * vox - box * pixel_size) > 0.02 * box * pixel_size:
            raise JaxhetInputError(f"{path}: mask box {n} x {vox:g} A does not match the particles "
                                   f"({box} x {pixel_size:g} A)")
        m = ndimage.zoom(m, box / n, order=1)
        if m.shape[0] != box:  # rounding of zoom's output shape
            m = m[:box, :box, :box] if m.shape[0] > box else np.pad(m, [(0, box - m.shape[0])] * 3)
    elif vox and abs(vox - pixel_size) > 0.02 * pixel_size:
        raise JaxhetInputError(f"{path}: mask voxel size {vox:g} A differs from the particles' {pixel_size:g} A")
    m = np.clip(m, 0.0, 1.0)
    if m.max() <= 0:
        raise JaxhetInputError(f"{path}: the mask is empty")
    return m


def run(args) -> int:
    from jaxhet._errors import JaxhetInputError
    from jaxhet.analysis import save_map_series_sections
    from jaxhet.cli._classify import check_outputs
    from jaxhet.cli._train import open_particles
    from jaxhet.inference import MultiBodyConfig, component_movie, motion_pca, multibody_model, multibody_refine
    from jaxhet.io import read_mrc, write_mrc
    from jaxhet.models import save_model

    if len(args.masks) < 2:
        raise JaxhetInputError("--masks: give at least two body masks")
    if args.iters < 1 or args.components < 1:
        raise JaxhetInputError("need --iters >= 1 and --components >= 1")
    ds = open_particles(args)
    table = ds.table
    if not table.has_poses:
        raise JaxhetInputError(f"{args.particles}: the particles have no poses (consensus refinement first)")
    D, pix = ds.image_size, float(ds.pixel_size_in_angstroms)
    masks = np.stack([fit_mask(m, D, pix) for m in args.masks])
    nb = len(masks)
    out = args.out
    check_outputs(out, list(OUTPUTS) + [f"body_{b + 1}.mrc" for b in range(nb)], args.force)
    ckpt = os.path.join(out, "checkpoint.npz")
    if args.force and os.path.exists(ckpt):
        os.remove(ckpt)
    consensus = None
    if args.consensus:
        consensus = np.asarray(read_mrc(args.consensus)[0], np.float32)
        if consensus.shape != (D, D, D):
            raise JaxhetInputError(f"{args.consensus}: consensus map shape {consensus.shape} != particles' box {D}")
    cfg = MultiBodyConfig(sigma_rotation_in_degrees=args.sigma_rot, sigma_translation_in_angstroms=args.sigma_trans,
                          local_search_in_degrees=args.local_search, local_step_in_degrees=args.local_step,
                          gauss_newton_steps=args.gn_steps, initial_resolution_in_angstroms=args.initial_resolution,
                          batch_size=args.batch_size, seed=args.seed)
    state, hist = multibody_refine(ds, masks, consensus, n_iterations=args.iters, config=cfg, checkpoint=ckpt,
                                   progress=True, log=print)
    C = min(args.components, 6 * nb)
    pca = motion_pca(state.motions, C)
    np.save(os.path.join(out, "latents.npy"), pca.latents.astype(np.float32))
    np.save(os.path.join(out, "body_motions.npy"), state.motions.astype(np.float32))
    write_mrc(os.path.join(out, "consensus.mrc"), state.consensus, pix, overwrite=True)
    for b in range(nb):
        write_mrc(os.path.join(out, f"body_{b + 1}.mrc"), state.body_maps[b], pix, overwrite=True)
    model = multibody_model(state)
    mpath = os.path.join(out, "multibody_model.npz")
    if os.path.exists(mpath):
        os.remove(mpath)
    save_model(mpath, model)
    movies = os.path.join(out, "movies")
    os.makedirs(movies, exist_ok=True)
    if args.movie_frames > 0:
        for j in range(C):
            maps, vals = component_movie(model, pca, j, args.movie_frames)
            for f, v in enumerate(maps):
                write_mrc(os.path.join(movies, f"component_{j + 1}_frame_{f + 1:02d}.mrc"), v, pix, overwrite=True)
            save_map_series_sections(maps, os.path.join(movies, f"component_{j + 1}.png"),
                                     labels=[f"{x:.2g}" for x in vals],
                                     title=f"component {j + 1} "
                                           f"({100 * pca.explained_variance_ratio[j]:.1f}% of variance)")
    labels = [f"body{b + 1}_{n}" for b in range(nb) for n in ("rot_x_deg", "rot_y_deg", "rot_z_deg", "x_A", "y_A",
                                                                 "z_A")]
    with open(os.path.join(out, "pca.json"), "w") as fh:
        json.dump(dict(coordinates=labels, mean=pca.mean.tolist(), components=pca.components.tolist(),
                       explained_variance=pca.explained_variance.tolist(),
                       explained_variance_ratio=pca.explained_variance_ratio.tolist(),
                       centers_in_angstroms=state.centers.tolist()), fh, indent=2)
    with open(os.path.join(out, "multibody.json"), "w") as fh:
        json.dump(dict(particles=os.path.abspath(args.particles), masks=[os.path.abspath(m) for m in args.masks],
                       n_particles=int(len(state.motions)), config=cfg._asdict(), iterations=int(state.iteration),
                       history=[dict(objective=h.objective, motion_rms=h.motion_rms.tolist(),
                                     resolution=[float(x) for x in h.resolution], max_radius=h.max_radius)
                                for h in hist]), fh, indent=2)
    ev = ", ".join(f"{100 * x:.1f}%" for x in pca.explained_variance_ratio[:C])
    print(f"{nb} bodies; motion components explain {ev}")
    print(f"wrote {out}/latents.npy [{len(state.motions)}, {C}], body_motions.npy, consensus.mrc, body_1..{nb}.mrc, "
          f"movies/, pca.json, multibody_model.npz")
    return 0
