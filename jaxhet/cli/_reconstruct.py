"""``jaxhet reconstruct``: known-pose gold-standard reconstruction with a Wiener filter.

Also holds the helpers shared by ``jaxhet refine`` and ``jaxhet abinitio`` (loading
particles, refusing to overwrite, writing maps, FSC text/PNG and sections).
"""

from __future__ import annotations

import argparse
import os
import time


def add_particle_args(p) -> None:
    p.add_argument("particles", help="RELION .star, cryoSPARC .cs, or an .mrcs stack (with --poses/--ctf pkls)")
    p.add_argument("--poses", default=None, help="cryoDRGN poses .pkl (replaces the file's poses)")
    p.add_argument("--ctf", default=None, help="cryoDRGN ctf .pkl (replaces the file's CTF)")
    p.add_argument("--datadir", default=None, help="folder of the stacks named in a STAR/.cs file")
    p.add_argument("--downsample", type=int, default=None, metavar="D", help="Fourier-crop the images to box D")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the gold-standard half split")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def load_dataset(args, need_poses: bool):
    """(ParticleTable, ParticleDataset) from the common arguments."""
    from jaxhet._errors import JaxhetInputError
    from jaxhet.io import ParticleDataset, read_particles

    table = read_particles(args.particles, poses=args.poses, ctf=args.ctf, datadir=args.datadir)
    if len(table) == 0:
        raise JaxhetInputError(f"{args.particles}: no particles")
    if need_poses and not table.has_poses:
        raise JaxhetInputError(f"{args.particles}: no poses (give --poses, or run jaxhet abinitio / jaxhet refine)")
    if not table.has_ctf:
        raise JaxhetInputError(f"{args.particles}: no CTF parameters (give --ctf)")
    if args.batch_size < 1:
        raise JaxhetInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    return table, ParticleDataset(table, downsample_to=args.downsample)


def check_outputs(paths, force: bool) -> None:
    """Refuse to run if any output exists (unless force), before any work is done."""
    from jaxhet._errors import JaxhetInputError
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise JaxhetInputError(f"{existing[0]}: exists (pass --force to overwrite)")


def map_output_paths(map_path: str) -> dict:
    """The files written next to a map: half maps, mask, FSC text/PNG, sections PNG."""
    folder = os.path.dirname(os.path.abspath(map_path))
    stem = os.path.splitext(os.path.basename(map_path))[0]
    return dict(map=os.path.abspath(map_path), half1=os.path.join(folder, f"{stem}_half1.mrc"),
                half2=os.path.join(folder, f"{stem}_half2.mrc"), mask=os.path.join(folder, f"{stem}_mask.mrc"),
                fsc_txt=os.path.join(folder, "fsc.txt"), fsc_png=os.path.join(folder, "fsc.png"),
                sections=os.path.join(folder, "sections.png"))


def write_reconstruction(res, paths: dict, force: bool, title: str = "") -> None:
    """Write a ReconstructionResult: maps, mask, FSC text + PNG, central sections."""
    from jaxhet.analysis import save_central_sections, save_fsc_plot, write_fsc_text
    from jaxhet.io import write_mrc

    os.makedirs(os.path.dirname(paths["map"]), exist_ok=True)
    write_mrc(paths["map"], res.volume, res.pixel_size, overwrite=force)
    write_mrc(paths["half1"], res.half_maps[0], res.pixel_size, overwrite=force)
    write_mrc(paths["half2"], res.half_maps[1], res.pixel_size, overwrite=force)
    write_mrc(paths["mask"], res.mask, res.pixel_size, overwrite=force)
    D = res.volume.shape[-1]
    curves = {"fsc_masked": res.fsc_masked, "fsc_unmasked": res.fsc_unmasked}
    write_fsc_text(paths["fsc_txt"], curves, res.pixel_size, D)
    with open(paths["fsc_txt"], "a") as fh:
        fh.write(f"# resolution (masked FSC) at 0.143: {res.resolution_0143:.3f} A; at 0.5: {res.resolution_05:.3f} A\n")
        fh.write(f"# images per half: {int(res.n_images[0])} {int(res.n_images[1])}\n")
    save_fsc_plot(paths["fsc_png"], {"masked": res.fsc_masked, "unmasked": res.fsc_unmasked}, res.pixel_size,
                  title=title or "half-map FSC")
    save_central_sections(res.volume, paths["sections"], title=title or None)


def register(sub) -> None:
    p = sub.add_parser(
        "reconstruct", help="known-pose reconstruction (gold-standard half maps, FSC, Wiener filter)",
        description="Backproject particles with their poses and CTFs (pad 2, trilinear, gridding correction), "
                    "as two random half sets; the half-map FSC gives the per-shell SNR of a Wiener filter "
                    "(as relion_reconstruct). Writes MAP, MAP_half1.mrc, MAP_half2.mrc, MAP_mask.mrc (soft "
                    "solvent mask of the masked FSC), fsc.txt, fsc.png and sections.png next to -o.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_particle_args(p)
    p.add_argument("-o", "--output", required=True, help="output map (.mrc)")
    p.add_argument("--pad", type=int, default=2, help="Fourier padding factor")
    p.add_argument("--wiener", choices=["shell", "voxel", "none"], default="shell",
                   help="Wiener filter: per-shell gain SNR/(1+SNR), RELION's per-voxel 1/tau^2, or none")
    p.add_argument("--tau2-fudge", type=float, default=1.0, help="multiplies the FSC-derived SNR")
    p.add_argument("--snr-from", choices=["masked", "unmasked"], default="masked",
                   help="half-map FSC for the Wiener filter: inside the solvent mask or over the whole box")
    p.add_argument("--no-gridding-correction", action="store_true", help="skip the sinc^2 correction")
    p.add_argument("--mask", default=None, help="mask .mrc for the masked FSC (default: automatic solvent mask)")
    p.add_argument("--mask-diameter", type=float, default=None, metavar="A",
                   help="diameter (A) of the soft spherical mask applied to the maps (RELION softMaskOutsideMap, "
                        "3 px cosine edge, outside set to its mean); default: the box (radius D/2, as "
                        "relion_reconstruct)")
    p.add_argument("--no-outer-mask", action="store_true", help="do not mask the maps outside the sphere")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxhet._errors import JaxhetInputError
    from jaxhet.inference import reconstruct
    from jaxhet.io import read_mrc

    if not args.output.endswith((".mrc", ".map")):
        raise JaxhetInputError(f"{args.output}: the output map must end in .mrc")
    if args.pad < 1:
        raise JaxhetInputError(f"--pad must be >= 1, got {args.pad}")
    paths = map_output_paths(args.output)
    check_outputs(paths.values(), args.force)
    table, ds = load_dataset(args, need_poses=True)
    mask = None
    if args.mask:
        mask, _ = read_mrc(args.mask)
        if mask.shape != (ds.image_size,) * 3:
            raise JaxhetInputError(f"{args.mask}: mask shape {mask.shape} does not match box {ds.image_size}")
    radius_px = None
    if args.mask_diameter is not None:
        if args.mask_diameter <= 0:
            raise JaxhetInputError(f"--mask-diameter must be > 0, got {args.mask_diameter}")
        radius_px = args.mask_diameter / 2.0 / float(ds.pixel_size_in_angstroms)
    t0 = time.time()
    res = reconstruct(ds, batch_size=args.batch_size, pad_factor=args.pad, seed=args.seed,
                      tau2_fudge=args.tau2_fudge, wiener=args.wiener, snr_from=args.snr_from,
                      gridding_correction=not args.no_gridding_correction, mask=mask, progress=True,
                      outer_mask=not args.no_outer_mask, outer_mask_radius=radius_px)
    dt = time.time() - t0
    write_reconstruction(res, paths, args.force, title=os.path.basename(args.output))
    print(f"reconstructed {len(ds)} particles (box {ds.image_size}, {res.pixel_size:.4g} A/px) in {dt:.1f} s; "
          f"resolution (masked FSC) {res.resolution_0143:.2f} A at 0.143, {res.resolution_05:.2f} A at 0.5; "
          f"wrote {paths['map']}, half maps, mask, {paths['fsc_txt']}, {paths['fsc_png']}, {paths['sections']}")
    return 0
