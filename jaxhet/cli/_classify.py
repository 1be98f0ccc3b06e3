"""``jaxhet classify PARTICLES -k K -o OUT``: 3D classification (EM over class and pose).

Writes into OUT: ``classes.npy`` ([N] most likely class, 0-based, input particle order),
``class_probs.npy`` ([N, K] posterior class probabilities), ``class_1.mrc`` ...
``class_K.mrc`` (the class maps, 1-based names as RELION), ``classes.png`` (projections of
the class maps side by side), ``particles.star`` (the input particles with
``rlnClassNumber``, 1-based, and, after a local search, the refined poses),
``classify.json`` (settings and per-iteration history) and ``checkpoint.npz`` (state after
every iteration; an interrupted run in the same folder resumes from it).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

OUTPUTS = ("classes.npy", "class_probs.npy", "classes.png", "particles.star", "classify.json")


def register(sub) -> None:
    from jaxhet.cli._train import add_particle_arguments

    p = sub.add_parser(
        "classify", help="3D classification into K maps (EM over class and pose)",
        description="3D classification (RELION-style maximum likelihood): K class maps initialised from random "
                    "subsets, EM over class (and a local pose search with --local-search), class priors, noise "
                    "spectrum and a growing resolution limit. Needs particles with poses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_particle_arguments(p)
    p.add_argument("-k", "--classes", type=int, required=True, help="number of classes K")
    p.add_argument("--iters", type=int, default=15, help="maximum EM iterations")
    p.add_argument("--local-search", type=float, default=0.0, metavar="DEG",
                   help="local rotation search range around each pose (0: keep the given poses)")
    p.add_argument("--local-step", type=float, default=None, metavar="DEG", help="its step (default DEG/2)")
    p.add_argument("--shift-search", type=float, default=0.0, metavar="PX", help="local shift search range")
    p.add_argument("--initial-resolution", type=float, default=30.0, metavar="A",
                   help="resolution limit of the first E-step")
    p.add_argument("--tol", type=float, default=0.001,
                   help="stop when fewer than this fraction of images change class and the resolution is stable")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs in OUT")
    p.set_defaults(func=run)


def write_star_with_columns(path: str, table, columns: dict, overwrite: bool = False) -> None:
    """Write ``table`` as RELION STAR (:func:`jaxhet.io.write_star`) with extra per-particle
    columns ``{"rlnClassNumber": [N] values}`` added to the particles block."""
    import starfile

    from jaxhet._errors import JaxhetInputError
    from jaxhet.io._star import star_text

    if os.path.exists(path) and not overwrite:
        raise JaxhetInputError(f"{path}: file exists (use --force)")
    text = star_text(table, path)
    head = "".join(line + "\n" for line in text.splitlines()[:3] if line.startswith("#"))
    tmp_in = _tmp_text(text)
    try:
        blocks = starfile.read(tmp_in, always_dict=True)
    finally:
        os.remove(tmp_in)
    key = "particles" if "particles" in blocks else max(blocks, key=lambda k: len(blocks[k]))
    P = blocks[key]
    for name, vals in columns.items():
        P[name] = np.asarray(vals)
    blocks[key] = P
    body = starfile.to_string(blocks, float_format="%.6f")
    if body.startswith("#"):
        body = body.split("\n", 1)[1]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(head + body)
    os.replace(tmp, path)


def _tmp_text(text: str) -> str:
    """starfile reads paths: stage the text in a temporary file."""
    import tempfile
    fd, p = tempfile.mkstemp(suffix=".star")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return p


def check_outputs(out: str, names, force: bool) -> None:
    from jaxhet._errors import JaxhetInputError
    os.makedirs(out, exist_ok=True)
    clash = [n for n in names if os.path.exists(os.path.join(out, n))]
    if clash and not force:
        raise JaxhetInputError(f"{out}: already holds {', '.join(clash[:4])}{' ...' if len(clash) > 4 else ''} "
                               "(use --force to overwrite)")


def run(args) -> int:
    from jaxhet._errors import JaxhetInputError
    from jaxhet.analysis import save_map_series_sections
    from jaxhet.cli._train import open_particles
    from jaxhet.core import matrix_to_euler
    from jaxhet.inference import ClassificationConfig, classify
    from jaxhet.io import write_mrc

    if args.classes < 1 or args.iters < 1:
        raise JaxhetInputError("need -k >= 1 and --iters >= 1")
    ds = open_particles(args)
    table = ds.table
    if not table.has_poses:
        raise JaxhetInputError(f"{args.particles}: the particles have no poses (give --poses, or refine first)")
    K = int(args.classes)
    out = args.out
    check_outputs(out, list(OUTPUTS) + [f"class_{k + 1}.mrc" for k in range(K)], args.force)
    ckpt = os.path.join(out, "checkpoint.npz")
    if args.force and os.path.exists(ckpt):
        os.remove(ckpt)
    cfg = ClassificationConfig(n_classes=K, local_search_in_degrees=args.local_search,
                               local_step_in_degrees=args.local_step, shift_search_in_pixels=args.shift_search,
                               initial_resolution_in_angstroms=args.initial_resolution, batch_size=args.batch_size,
                               seed=args.seed)
    state, hist = classify(ds, config=cfg, n_iterations=args.iters, checkpoint=ckpt, progress=True, log=print,
                           tol_changed=args.tol)
    probs = state.class_probs
    classes = probs.argmax(1).astype(np.int64)
    np.save(os.path.join(out, "classes.npy"), classes)
    np.save(os.path.join(out, "class_probs.npy"), probs.astype(np.float32))
    for k in range(K):
        write_mrc(os.path.join(out, f"class_{k + 1}.mrc"), state.maps[k], state.pixel_size, overwrite=True)
    frac = np.bincount(classes, minlength=K) / len(classes)
    save_map_series_sections(state.maps, os.path.join(out, "classes.png"),
                             labels=[f"class {k + 1}: {100 * frac[k]:.1f}%" for k in range(K)],
                             title=f"{K} classes, {len(classes)} particles")
    wrote_star = False
    if table.has_ctf:
        t2 = table.copy()
        if cfg.local_search_in_degrees > 0 or cfg.shift_search_in_pixels > 0:
            t2.euler_in_degrees = np.asarray(matrix_to_euler(state.rotations), np.float64)
            t2.origin_in_pixels = np.asarray(state.origin_in_pixels, np.float64) / ds.scale
        write_star_with_columns(os.path.join(out, "particles.star"), t2, {"rlnClassNumber": classes + 1},
                                overwrite=True)
        wrote_star = True
    with open(os.path.join(out, "classify.json"), "w") as fh:
        json.dump(dict(particles=os.path.abspath(args.particles), n_particles=int(len(classes)), config=cfg._asdict(),
                       iterations=int(state.iteration), class_fractions=frac.tolist(),
                       resolution_0143=[float(h) for h in hist[-1].resolution] if hist else None,
                       history=[dict(log_likelihood=h.log_likelihood, changed=h.changed_fraction,
                                     sizes=h.class_sizes.tolist(), max_radius=h.max_radius, reseeded=h.reseeded)
                                for h in hist]), fh, indent=2)
    print(f"{K} classes: " + ", ".join(f"class {k + 1} {100 * frac[k]:.1f}%" for k in range(K)))
    print(f"wrote {out}/classes.npy, class_probs.npy, class_1..{K}.mrc, classes.png"
          + (", particles.star" if wrote_star else " (no STAR: particles without CTF)"))
    return 0
