"""``jaxhet train <family> ...``: train a heterogeneity model (a registry of trainers).

``jaxhet train vae PARTICLES -o OUT --zdim 8 --epochs 20 [--poses P.pkl --ctf C.pkl]``
trains the cryoDRGN-style VAE (:func:`jaxhet.inference.train_vae`) and writes
``OUT/latents.npy`` ([N, zdim] posterior means, input particle order), ``OUT/z.pkl``
(cryoDRGN-style), ``OUT/model.npz`` (the decoder), ``OUT/checkpoint.npz`` (every epoch;
``--resume`` continues exactly) and ``OUT/config.json``.

Adding a model family (``jaxhet train ppca``, ``jaxhet train gmm`` ...): create a module
``jaxhet/cli/_train_<family>.py`` defining ``TRAINER = Trainer(name, help,
add_arguments, run)``; it is discovered automatically (no edit here or in main.py).
:func:`add_particle_arguments` and :func:`open_particles` give every trainer the same
particle options (STAR / .cs / .mrcs with cryoDRGN pkls, --datadir, --downsample).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import Callable, NamedTuple

from jaxhet._errors import JaxhetInputError

__all__ = ["Trainer", "TRAINERS", "register_trainer", "add_particle_arguments", "open_particles", "register", "run"]


class Trainer(NamedTuple):
    """A ``jaxhet train <name>`` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


TRAINERS: dict[str, Trainer] = {}


def register_trainer(trainer: Trainer) -> Trainer:
    TRAINERS[trainer.name] = trainer
    return trainer


def add_particle_arguments(p: argparse.ArgumentParser) -> None:
    """PARTICLES, --poses, --ctf, --datadir, --downsample, -o."""
    p.add_argument("particles", help="particles: .star (RELION), .cs (cryoSPARC), or .mrcs/.txt with --poses/--ctf")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--poses", help="cryoDRGN poses .pkl (replaces the file's poses)")
    p.add_argument("--ctf", help="cryoDRGN ctf .pkl (replaces the file's CTF)")
    p.add_argument("--datadir", help="folder holding the stacks named in a STAR/.cs file")
    p.add_argument("--downsample", type=int, default=None, metavar="D",
                   help="train on images Fourier-cropped to box D (even)")


def open_particles(args):
    """The ParticleDataset of the particle arguments."""
    from jaxhet import io as jio
    table = jio.read_particles(args.particles, poses=args.poses, ctf=args.ctf, datadir=args.datadir)
    return jio.ParticleDataset(table, downsample_to=args.downsample)


# ----------------------------------------------------------------------------- vae

def _vae_arguments(p: argparse.ArgumentParser) -> None:
    add_particle_arguments(p)
    p.add_argument("--zdim", type=int, required=True, help="latent dimension")
    p.add_argument("-n", "--epochs", type=int, default=20, help="epochs (default 20)")
    p.add_argument("-b", "--batch-size", type=int, default=16, help="images per step (default 16, cryoDRGN's)")
    p.add_argument("--encoder", default="mlp", choices=["mlp", "mlp_real", "cnn", "autodecoder"],
                   help="mlp: cryoDRGN's MLP over the masked Hartley image; mlp_real: real-space pixels in "
                        "the disc; cnn: small CNN; autodecoder: a free latent per image")
    p.add_argument("--enc-dim", type=int, default=256)
    p.add_argument("--enc-layers", type=int, default=3)
    p.add_argument("--dec-dim", type=int, default=256)
    p.add_argument("--dec-layers", type=int, default=3)
    p.add_argument("--pe-type", default="gaussian", choices=["gaussian", "geom_lowf"])
    p.add_argument("--pe-dim", type=int, default=None, help="encoding frequencies per axis (default D/2)")
    p.add_argument("--feat-sigma", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=None, help="KL weight (default 2/zdim; cryoDRGN's objective: 1/zdim with --noise-variance half the pixel variance)")
    p.add_argument("--noise-variance", type=float, default=None,
                   help="per-pixel noise variance sigma^2 of the likelihood (default: the data's pixel variance; "
                        "half of it reproduces cryoDRGN's objective)")
    p.add_argument("--no-window", action="store_true",
                   help="do not multiply the images by cryoDRGN's soft circular real-space window")
    p.add_argument("--window-r", type=float, default=0.85, help="window inner radius, fraction of D/2 (0.85)")
    p.add_argument("--save-every", type=int, default=0,
                   help="also write OUT/epochs/latents.<e>.npy and model.<e>.npz every this many epochs (0: off)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pose-refine", action="store_true", help="learn per-image rotation/shift corrections")
    p.add_argument("--pose-lr", type=float, default=3e-4)
    p.add_argument("--pose-refine-start", type=int, default=2, help="first epoch (1-based) that refines poses")
    p.add_argument("--ctf-sign", default="relion", choices=["relion", "cryodrgn"])
    p.add_argument("--devices", type=int, default=None, help="data-parallel over this many local devices (default all)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    p.add_argument("--no-progress", action="store_true")


def _vae_run(args) -> int:
    import jax
    from jaxhet.inference import VAEConfig, make_mesh, train_vae
    if args.zdim < 1:
        raise JaxhetInputError(f"--zdim must be >= 1, got {args.zdim}")
    if args.epochs < 1:
        raise JaxhetInputError(f"--epochs must be >= 1, got {args.epochs}")
    data = open_particles(args)
    cfg = VAEConfig(zdim=args.zdim, encoder=args.encoder, enc_dim=args.enc_dim, enc_layers=args.enc_layers,
                    dec_dim=args.dec_dim, dec_layers=args.dec_layers, pe_type=args.pe_type, pe_dim=args.pe_dim,
                    feat_sigma=args.feat_sigma, beta=args.beta, lr=args.lr, batch_size=args.batch_size,
                    epochs=args.epochs, seed=args.seed, pose_refine=args.pose_refine, pose_lr=args.pose_lr,
                    pose_refine_start=args.pose_refine_start, ctf_sign=args.ctf_sign, downsample=args.downsample,
                    noise_variance=args.noise_variance, window=not args.no_window, window_r=args.window_r,
                    save_every=args.save_every)
    devs = jax.local_devices()
    mesh = make_mesh(devs[:args.devices] if args.devices else devs)
    import os
    extra = dict(particles=os.path.abspath(args.particles), poses=args.poses and os.path.abspath(args.poses),
                 ctf=args.ctf and os.path.abspath(args.ctf), datadir=args.datadir,
                 data_box_size=int(data.box), data_pixel_size=float(data.original_pixel_size))
    res = train_vae(data, args.out, cfg, resume=args.resume, mesh=mesh, progress=not args.no_progress,
                    extra_meta=extra)
    print(f"wrote {args.out}/latents.npy ({res.latents.shape[0]} x {res.latents.shape[1]}), z.pkl, model.npz, "
          f"checkpoint.npz, config.json")
    return 0


register_trainer(Trainer("vae", "cryoDRGN-style VAE (or autodecoder) with known poses", _vae_arguments, _vae_run))


def _discover() -> None:
    import jaxhet.cli as pkg
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name.startswith("_train_"):
            mod = importlib.import_module(f"jaxhet.cli.{m.name}")
            t = getattr(mod, "TRAINER", None)
            if isinstance(t, Trainer):
                register_trainer(t)


def register(subparsers) -> None:
    _discover()
    p = subparsers.add_parser("train", help="train a heterogeneity model (vae, ...)",
                              description="Train a heterogeneity model. Families: "
                                          + ", ".join(sorted(TRAINERS)))
    sub = p.add_subparsers(dest="family", metavar="FAMILY")
    for name in sorted(TRAINERS):
        t = TRAINERS[name]
        sp = sub.add_parser(name, help=t.help, description=t.help,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        t.add_arguments(sp)
        sp.set_defaults(func=t.run)
    p.set_defaults(func=run, _train_parser=p)


def run(args) -> int:
    """``jaxhet train`` without a family: print the families."""
    args._train_parser.print_help()
    return 1
