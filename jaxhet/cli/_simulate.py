"""``jaxhet simulate``: a particle stack with ground truth from an atomic model or trajectory."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "simulate", help="simulate particles with ground truth from an atomic model or trajectory",
        description="Simulate particle images (uniform orientations, CTF, shifts, noise at an SNR) from a "
                    "bundled AdK structure/transition path, a PDB file or an .npz trajectory. Writes "
                    "particles.mrcs, particles.star (RELION 3.1), poses.pkl/ctf.pkl (cryoDRGN), labels.npy "
                    "(frame of each image), gt/frame_XXX.mrc ground-truth maps, sim_config.json, particles.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--structure", default="adk-transition",
                   help="adk-transition | adk-closed | adk-open | adk-closed-pdb | adk-open-pdb | FILE.pdb | FILE.npz")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("-n", "--n-images", type=int, default=1000)
    p.add_argument("--box", type=int, default=64, help="box size D in pixels")
    p.add_argument("--pixel-size", type=float, default=2.0, help="A/px")
    p.add_argument("--snr", type=float, default=0.1, help="var(clean)/var(noise); 0 for no noise")
    p.add_argument("--frames", type=str, default=None, help="frames to use, e.g. '0,97' or '0-49' (default all)")
    p.add_argument("--population", type=str, default=None, help="comma-separated weights, one per chosen frame")
    p.add_argument("--defocus", type=float, nargs=2, default=(10000.0, 25000.0), metavar=("MIN", "MAX"),
                   help="defocus range in A (underfocus positive)")
    p.add_argument("--astigmatism", type=float, default=500.0, help="max |dU - dV| in A")
    p.add_argument("--voltage", type=float, default=300.0, help="kV")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm")
    p.add_argument("--amp-contrast", type=float, default=0.1)
    p.add_argument("--b-factor", type=float, default=0.0, help="CTF envelope B-factor, A^2")
    p.add_argument("--max-shift", type=float, default=0.0, help="max |origin| per axis, px")
    p.add_argument("--atom-sigma", type=float, default=None, help="Gaussian atom width in A (default: pixel size)")
    p.add_argument("--gt-maps", choices=["used", "all", "none"], default="used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs in the folder")
    p.set_defaults(func=run)


def _parse_frames(text: str | None):
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def run(args) -> int:
    from jaxhet._errors import JaxhetInputError
    from jaxhet.sim import SimulationParams, simulate_dataset

    try:
        frames = _parse_frames(args.frames)
        population = [float(x) for x in args.population.split(",")] if args.population else None
    except ValueError:
        raise JaxhetInputError(f"--frames/--population: cannot parse {args.frames!r} / {args.population!r}") from None
    if args.n_images < 1 or args.box < 8 or args.pixel_size <= 0 or args.snr < 0:
        raise JaxhetInputError("need -n >= 1, --box >= 8, --pixel-size > 0, --snr >= 0")
    if population is not None and frames is not None and len(population) != len(frames):
        raise JaxhetInputError(f"--population has {len(population)} weights for {len(frames)} frames")
    params = SimulationParams(
        n_images=args.n_images, box_size=args.box, pixel_size=args.pixel_size, snr=args.snr,
        atom_sigma_in_angstroms=args.atom_sigma, defocus_min_in_angstroms=args.defocus[0],
        defocus_max_in_angstroms=args.defocus[1], astigmatism_max_in_angstroms=args.astigmatism,
        voltage_in_kilovolts=args.voltage, spherical_aberration_in_mm=args.cs, amplitude_contrast=args.amp_contrast,
        b_factor_in_angstroms2=args.b_factor, max_shift_in_pixels=args.max_shift, frames=frames,
        population=population, seed=args.seed)
    ds = simulate_dataset(args.out, args.structure, params, gt_maps=args.gt_maps, overwrite=args.force, progress=True)
    print(f"wrote {params.n_images} particles to {ds.stack}, {ds.star}, {ds.poses_pkl}, {ds.ctf_pkl}; "
          f"labels {ds.labels}; {len(ds.gt_frames)} ground-truth maps in {ds.gt_dir}; noise sigma {ds.noise_sigma:.4g}")
    return 0
