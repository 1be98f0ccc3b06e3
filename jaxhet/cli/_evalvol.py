"""``jaxhet eval-vol OUT --latents Z.npy -o DIR``: maps at any latent (survey §9.1).

Two routes:

- *decoder*: one MRC per row of Z.npy (``DIR/vol_000.mrc`` ...), the trained model's map
  at that latent, on the data's box and voxel size (a model trained on downsampled images
  is evaluated on the full grid: DFT values do not depend on the pixel size, so this is
  its Fourier-padded map);
- *reconstruction* (``--reconstruct``): for every row z of Z.npy, a homogeneous
  known-pose reconstruction (:func:`jaxhet.inference.reconstruct`, CTF-weighted direct
  Fourier inversion with a FSC-based Wiener filter) from the particles whose latents are
  nearest z (``--n-nearest``, or all within ``--radius``); writes
  ``DIR/reconstruct_000.mrc`` ... and ``DIR/reconstruct.json`` (images used, resolution).
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxhet._errors import JaxhetInputError

__all__ = ["register", "run", "maps_at_latents", "reconstruct_near"]


def _read_latents(path: str, zdim: int) -> np.ndarray:
    if path.endswith(".pkl"):
        import pickle
        with open(path, "rb") as f:
            z = pickle.load(f)
    elif path.endswith(".txt"):
        z = np.loadtxt(path, ndmin=2)
    else:
        try:
            z = np.load(path)
        except (ValueError, OSError) as e:
            raise JaxhetInputError(f"{path}: cannot read latents ({e})") from None
    z = np.asarray(z, np.float32)
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2 or z.shape[1] != zdim:
        raise JaxhetInputError(f"{path}: latents must be [n, {zdim}], got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise JaxhetInputError(f"{path}: latents contain NaN or inf")
    return z


def maps_at_latents(model, latents, box_size: int, pixel_size: float) -> list[np.ndarray]:
    """Maps [D, D, D] of a hyper-molecule at each latent row (one jitted function)."""
    import jax
    import jax.numpy as jnp
    fn = jax.jit(lambda z: model.volume(z, box_size, pixel_size))
    return [np.asarray(fn(jnp.asarray(z))) for z in np.asarray(latents, np.float32)]


def _data_geometry(conf: dict) -> tuple[int, float]:
    D = int(conf.get("data_box_size") or conf["box_size"])
    a = float(conf.get("data_pixel_size") or conf["pixel_size"])
    return D, a


def reconstruct_near(conf: dict, latents_all: np.ndarray, point: np.ndarray, n_nearest: int | None,
                     radius: float | None, batch_size: int = 256, seed: int = 0):
    """Known-pose reconstruction from the images whose latents are nearest ``point``.

    Returns (ReconstructionResult, indices of the images used).
    """
    from jaxhet import io as jio
    from jaxhet.inference import reconstruct
    d = np.linalg.norm(latents_all - point[None], axis=1)
    if radius is not None:
        sel = np.nonzero(d <= radius)[0]
    else:
        sel = np.argsort(d)[: int(n_nearest)]
    if len(sel) < 2:
        raise JaxhetInputError(f"reconstruction near {point.tolist()}: only {len(sel)} images; raise --radius")
    sel = np.sort(sel)
    if not conf.get("particles"):
        raise JaxhetInputError("config.json: no particle file recorded (train with `jaxhet train vae`)")
    table = jio.read_particles(conf["particles"], poses=conf.get("poses"), ctf=conf.get("ctf"),
                               datadir=conf.get("datadir"))
    ds = jio.ParticleDataset(table)
    res = reconstruct(ds.batches(batch_size, indices=sel), batch_size=batch_size, seed=seed,
                      ctf_sign=conf.get("config", {}).get("ctf_sign", "relion"))
    return res, sel


def register(subparsers) -> None:
    p = subparsers.add_parser("eval-vol", help="maps at latents: from the trained decoder or by reconstruction",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="training output folder (jaxhet train ...)")
    p.add_argument("--latents", required=True, help="latents [n, zdim] (.npy, .txt or cryoDRGN-style .pkl)")
    p.add_argument("-o", "--outdir", required=True, help="folder for the maps")
    p.add_argument("--prefix", default=None, help="file name prefix (default vol_ / reconstruct_)")
    p.add_argument("--box", type=int, default=None, help="output box (default: the data's)")
    p.add_argument("--pixel-size", type=float, default=None, help="output voxel size in A (default: the data's)")
    p.add_argument("--reconstruct", action="store_true",
                   help="reconstruct from the images whose latents are nearest each row instead of decoding")
    p.add_argument("--n-nearest", type=int, default=1000, help="images per reconstruction (default 1000)")
    p.add_argument("--radius", type=float, default=None, help="use all images within this latent distance")
    p.add_argument("--force", action="store_true", help="overwrite existing maps")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxhet.inference import load_vae
    from jaxhet import io as jio
    model, conf, z_all = load_vae(args.out)
    z = _read_latents(args.latents, model.latent_dim)
    D, a = _data_geometry(conf)
    D = args.box or D
    a = args.pixel_size or a
    os.makedirs(args.outdir, exist_ok=True)
    width = max(3, len(str(len(z) - 1)))
    if not args.reconstruct:
        prefix = args.prefix or "vol_"
        paths = [os.path.join(args.outdir, f"{prefix}{i:0{width}d}.mrc") for i in range(len(z))]
        if not args.force:
            for pth in paths:
                if os.path.exists(pth):
                    raise JaxhetInputError(f"{pth}: exists (use --force to overwrite)")
        for pth, vol in zip(paths, maps_at_latents(model, z, D, a)):
            jio.write_mrc(pth, vol, a, overwrite=args.force)
        print(f"wrote {len(paths)} maps ({D}^3, {a:g} A/px) to {args.outdir}")
        return 0
    if z_all is None:
        raise JaxhetInputError(f"{args.out}: no latents.npy to select images from")
    prefix = args.prefix or "reconstruct_"
    report = []
    for i, point in enumerate(z):
        pth = os.path.join(args.outdir, f"{prefix}{i:0{width}d}.mrc")
        if os.path.exists(pth) and not args.force:
            raise JaxhetInputError(f"{pth}: exists (use --force to overwrite)")
        res, sel = reconstruct_near(conf, z_all, point, args.n_nearest, args.radius)
        vol = res.volume
        if vol.shape[-1] != D:
            raise JaxhetInputError(f"--box {D}: reconstruction is on the data's box {vol.shape[-1]}")
        jio.write_mrc(pth, vol, res.pixel_size, overwrite=args.force)
        report.append(dict(file=os.path.basename(pth), latent=point.tolist(), n_images=int(len(sel)),
                           resolution_0143=float(res.resolution_0143)))
        print(f"{pth}: {len(sel)} images, FSC 0.143 resolution {res.resolution_0143:.1f} A")
    with open(os.path.join(args.outdir, f"{prefix.rstrip('_')}.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0
