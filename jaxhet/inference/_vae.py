"""Training a cryoDRGN-style VAE (or autodecoder) on particles with known poses.

Objective (survey §7.2; Zhong et al. 2021), per image i with half-layout DFT Y_i:

    L_i = 1/2 sum_{k in K} w_k |Y_i(k) - M_i(k)|^2 / (D^2 sigma^2)  +  beta KL(q(tau|Y_i) || N(0, I))
    M_i(k) = c_i(k) T_{s_i}(k) V(tau_i, A_i^T k),     tau_i = mu_i + exp(logvar_i / 2) eps

i.e. the negative Gaussian log-likelihood (white noise of per-pixel variance sigma^2,
:func:`jaxhet.core.gaussian_log_likelihood` up to a constant) of the CTF'd, shifted model
image (:func:`jaxhet.core.render_fourier` restricted to the frequencies K used:
0 < |k| <= D/2, the Nyquist circle without DC, as cryoDRGN), plus beta times the KL
divergence; w_k are the half-plane Parseval weights. The images are first multiplied by
cryoDRGN's soft circular real-space window (radius 0.85 -> 0.99 of D/2; ``window=False``
turns it off), which removes the noise in the corners where a centred particle has no
signal.

Likelihood scale vs cryoDRGN. cryoDRGN's ``train_vae`` minimises
``MSE(Hartley values / s) + beta KL / n_pixels`` with s^2 the variance of the
(unwindowed) data's Hartley values, beta = 1/zdim. By Parseval that is, up to a constant
factor Adam ignores, the loss above with sigma^2 = *half* the per-pixel variance of the
data: twice the Gaussian log-likelihood weight of the actual noise level, i.e. an
effective KL weight of beta/2 relative to the ELBO of the noise model. jaxhet's default
sigma^2 is the per-pixel variance of the data itself (the noise variance at the low SNR
of cryo-EM data; an upper bound otherwise), so the likelihood is the Gaussian noise
model's, and its default KL weight is beta = 2/zdim (4x cryoDRGN's effective weight);
giving ``noise_variance`` = half the pixel variance and ``beta`` = 1/zdim reproduces
cryoDRGN's objective exactly. With less weight on the KL the encoder spends latent
information on each image's noise and the decoder fits it (maps at the latents get
noisier as training goes on); beta = 1 with the true sigma^2 (the plain ELBO) collapses
the posterior at SNR ~0.05 (the latent is ignored). Measured on the AdK transition
(experiments/exp_vae_adk.py: 10k images, D=32, SNR 0.05, zdim 8, 20 epochs): beta 1/zdim
gives Spearman 0.751 and FSC-AUC 0.296, beta 2/zdim 0.794 and 0.318 (cryoDRGN 0.771, 0.277).
The encoder sees the centred, CTF-phase-flipped image (:mod:`jaxhet.models._encoders`); the
autodecoder replaces it by a free latent per image (MAP with a N(0, I) prior, weight beta).

Optional per-image pose refinement: a learnable rotation vector dr_i (radians) and shift
ds_i (pixels) per image, ``A_i <- exp([dr_i]) A_i``, ``s_i <- s_i + ds_i``, initialised at
zero and updated from epoch ``pose_refine_start`` on with a *row-sparse* Adam (only the
rows in the batch move, like PyTorch's SparseAdam in cryoDRGN). The autodecoder's latent
table uses the same sparse Adam.

Engineering: the model is split once (``nnx.split``) into a graphdef, trainable
``nnx.Param`` state and the fixed rest; the jitted step is a pure function of
(params, rest, optimizer state, per-image tables, batch, key); minibatches stream from
disk through :class:`jaxhet.io.ParticleDataset` (prefetched in a thread), every batch
padded to the same size (zero weights) so there is a single compilation. The step runs
data-parallel on all devices of a ``jax.sharding.Mesh`` over axis ``"data"`` (batch
sharded, parameters replicated; XLA inserts the gradient all-reduce). The data order of
epoch e is ``permutation(seed, e)`` and the noise key of step j is
``fold_in(fold_in(key(seed), e), j)``, so a checkpoint (written atomically after every
epoch: parameters, optimizer and table states, epoch, seed, data order, normalisation)
resumes to bit-identical parameters.

Reference: Zhong, Bepler, Berger & Davis (2021) Nat. Methods 18:176 (cryoDRGN);
Kingma & Welling (2014); Bojanowski et al. (2018) (autodecoders).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxhet._errors import JaxhetInputError
from jaxhet.core import (CTFParams, axis_angle_to_matrix, ctf as ctf_fn, half_plane_weights, rfft2_centered,
                         rotate_image_frequencies, shift_phase)
from jaxhet.core._fourier import half_frequency_grid_2d
from jaxhet.models import (CryoDRGNDecoder, create_encoder, encoder_input, hartley_mask_indices, load_model,
                           save_model)
from jaxhet.models._encoders import ENCODER_INPUT

__all__ = ["VAEConfig", "VAETrainState", "VAEResult", "InMemoryParticles", "train_vae", "encode_latents",
           "load_vae", "vae_loss_terms", "encode_batch", "real_space_window", "sparse_adam_update", "make_mesh", "VAE_FILES"]

VAE_FILES = dict(checkpoint="checkpoint.npz", config="config.json", model="model.npz", encoder="encoder.npz",
                 latents="latents.npy", logvar="latents_logvar.npy", zpkl="z.pkl", poses="pose_corrections.npy",
                 history="history.json")


@dataclasses.dataclass
class VAEConfig:
    """Hyper-parameters of :func:`train_vae` (defaults: cryoDRGN ``train_vae`` where it has one).

    Attributes:
        zdim: latent dimension.
        encoder: ``"mlp"`` (Hartley input in the circle, cryoDRGN), ``"mlp_real"``,
            ``"cnn"`` or ``"autodecoder"``.
        enc_dim, enc_layers, dec_dim, dec_layers: MLP widths and residual-layer counts.
        pe_type, pe_dim, feat_sigma: decoder positional encoding.
        beta: KL weight (None: 2/zdim; see the module docstring).
        noise_variance: sigma^2 per pixel (None: the data's per-pixel variance, measured on
            up to 1000 images before windowing; cryoDRGN's objective implies half of it).
        lr: Adam learning rate; ad_lr: autodecoder latent learning rate.
        batch_size, epochs, seed.
        pose_refine, pose_lr, pose_refine_start: per-image pose correction (epochs
            before ``pose_refine_start`` (1-based) keep poses fixed).
        ctf_sign: "relion" (data as RELION writes it) or "cryodrgn".
        downsample: train on images Fourier-cropped to this box (None: full size).
        window, window_r, window_outer: multiply every image by cryoDRGN's soft circular
            window (1 inside ``window_r``, 0 beyond ``window_outer``, fractions of D/2)
            before the encoder and the likelihood see it (cryoDRGN's default).
        save_every: every this many epochs also write ``epochs/latents.<epoch>.npy`` and
            ``epochs/model.<epoch>.npz`` (like cryoDRGN's ``z.<epoch>.pkl``,
            ``weights.<epoch>.pkl``), to follow the latents and maps during training (0: off).
    """

    zdim: int = 8
    encoder: str = "mlp"
    enc_dim: int = 256
    enc_layers: int = 3
    dec_dim: int = 256
    dec_layers: int = 3
    pe_type: str = "gaussian"
    pe_dim: int | None = None
    feat_sigma: float = 0.5
    beta: float | None = None
    noise_variance: float | None = None
    lr: float = 1e-4
    ad_lr: float = 1e-2
    batch_size: int = 16
    epochs: int = 20
    seed: int = 0
    pose_refine: bool = False
    pose_lr: float = 3e-4
    pose_refine_start: int = 2
    ctf_sign: str = "relion"
    downsample: int | None = None
    window: bool = True
    window_r: float = 0.85
    window_outer: float = 0.99
    save_every: int = 0

    def resolved_beta(self) -> float:
        return 2.0 / self.zdim if self.beta is None else float(self.beta)


class VAETrainState(NamedTuple):
    """Everything that changes during training (a pytree; saved in the checkpoint)."""

    params: Any            # nnx.State of trainable nnx.Param (encoder + decoder)
    opt_state: Any         # optax state
    tables: dict           # per-image arrays: "pose" [N, 5] (rotvec rad, shift px), "latent" [N, z]
    table_opt: dict        # sparse-Adam moments and per-row counts, same keys
    epoch: Any             # completed epochs (int32 scalar)


class VAEResult(NamedTuple):
    """Output of :func:`train_vae`: the decoder (a hyper-molecule), latents (input order), history."""

    decoder: Any
    latents: np.ndarray
    latents_logvar: np.ndarray | None
    pose_corrections: np.ndarray | None
    history: list


class _Batch(NamedTuple):
    images: Any       # [B, D, D] float32
    rotations: Any    # [B, 3, 3]
    shifts: Any       # [B, 2] pixels (= -origin)
    ctf: Any          # CTFParams of [B]
    indices: Any      # [B] int32 (n_images for padding rows)
    weights: Any      # [B] float32 (0 for padding rows)


class InMemoryParticles:
    """Particles held in arrays, with the batch interface of ``jaxhet.io.ParticleDataset``.

    Args:
        images: [N, D, D] float32 (mass per pixel, jaxhet's normalisation).
        rotations: [N, 3, 3] RELION matrices A.
        origin_in_pixels: [N, 2] RELION origins (None: zeros).
        ctf: CTFParams with [N] fields (None: no CTF).
        pixel_size: A.
    """

    def __init__(self, images, rotations, origin_in_pixels=None, ctf: CTFParams | None = None, pixel_size: float = 1.0):
        from jaxhet.inference._reconstruct import ImageBatch
        self._Batch = ImageBatch
        self.images = np.asarray(images, np.float32)
        n = len(self.images)
        self.rotations = np.asarray(rotations, np.float32).reshape(n, 3, 3)
        self.origin_in_pixels = np.zeros((n, 2), np.float32) if origin_in_pixels is None else \
            np.asarray(origin_in_pixels, np.float32).reshape(n, 2)
        self.ctf = None if ctf is None else CTFParams(*[np.broadcast_to(np.asarray(x, np.float32), (n,)) for x in ctf])
        self.image_size = self.images.shape[-1]
        self.pixel_size_in_angstroms = float(pixel_size)

    def __len__(self):
        return len(self.images)

    def get_batch(self, rows):
        rows = np.asarray(rows, np.int64)
        c = None if self.ctf is None else CTFParams(*[x[rows] for x in self.ctf])
        return self._Batch(self.images[rows], self.rotations[rows], self.origin_in_pixels[rows], c, rows,
                           self.pixel_size_in_angstroms)

    def batches(self, batch_size, shuffle=False, seed=0, indices=None, drop_last=False):
        rows = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64)
        if shuffle:
            rows = np.random.default_rng(seed).permutation(rows)
        stop = len(rows) - (len(rows) % batch_size if drop_last else 0)
        for s in range(0, stop, batch_size):
            yield self.get_batch(rows[s:s + batch_size])


# ----------------------------------------------------------------------------- helpers

def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over axis ``"data"`` (default: all local devices)."""
    devs = np.asarray(jax.local_devices() if devices is None else devices)
    return Mesh(devs, ("data",))


def sparse_adam_update(table, m, v, count, idx, grad_rows, row_mask, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Row-sparse Adam (PyTorch SparseAdam): update only the rows ``idx`` (where row_mask).

    Each row keeps its own step count for bias correction; rows not in the batch keep
    their value and moments. Rows of padding (``row_mask`` False) are dropped; their
    index may be out of range.
    """
    n = table.shape[0]
    safe = jnp.where(row_mask, idx, n)  # out of range -> dropped by the scatters
    c = jnp.take(count, idx, mode="clip") + 1
    mr = b1 * jnp.take(m, idx, axis=0, mode="clip") + (1 - b1) * grad_rows
    vr = b2 * jnp.take(v, idx, axis=0, mode="clip") + (1 - b2) * grad_rows * grad_rows
    cf = c.astype(jnp.float32)[:, None]
    step = lr * (mr / (1 - b1 ** cf)) / (jnp.sqrt(vr / (1 - b2 ** cf)) + eps)
    new_rows = jnp.take(table, idx, axis=0, mode="clip") - step
    return (table.at[safe].set(new_rows, mode="drop"), m.at[safe].set(mr, mode="drop"),
            v.at[safe].set(vr, mode="drop"), count.at[safe].set(c, mode="drop"))


class _VAE(nnx.Module):
    """Container of the encoder (None for the autodecoder) and the decoder."""

    def __init__(self, encoder, decoder):
        self.encoder = encoder
        self.decoder = decoder


class _Static(NamedTuple):
    """Per-run constants baked into the jitted step."""

    box_size: int
    pixel_size: float
    k_idx: np.ndarray        # [n_k] flat half-layout indices of K
    k2: np.ndarray           # [n_k, 2] cycles/box
    wts: np.ndarray          # [n_k] half-plane weights
    enc_input: str | None    # "hartley" | "real" | "image" | None (autodecoder)
    ctf_sign: str
    window: tuple | None = None  # (inner, outer) radii of the real-space window, fractions of D/2


def real_space_window(box_size: int, inner: float = 0.85, outer: float = 0.99) -> np.ndarray:
    """cryoDRGN's soft circular window [D, D]: 1 inside ``inner``, 0 beyond ``outer``, linear between.

    Radii are fractions of D/2 around the centre pixel D//2 (cryoDRGN's
    ``spherical_window_mask(D, in_rad=0.85, out_rad=0.99)``, applied to every image before
    its Fourier transform). Multiplying the images by it removes the noise in the corners,
    where a centred particle has no signal, from both the encoder's input and the
    reconstruction target.
    """
    x = (np.arange(box_size) - box_size // 2) / (box_size / 2)
    r = np.sqrt(x[:, None] ** 2 + x[None, :] ** 2)
    if outer <= inner:
        return (r <= outer).astype(np.float32)
    return np.clip(1.0 - (r - inner) / (outer - inner), 0.0, 1.0).astype(np.float32)


def _static(box_size: int, pixel_size: float, enc_input, ctf_sign, window: tuple | None = None) -> _Static:
    idx = hartley_mask_indices(box_size)
    k2 = half_frequency_grid_2d(box_size).reshape(-1, 2)[idx]
    w = half_plane_weights(box_size).ravel()[idx]
    win = None if window is None else (float(window[0]), float(window[1]))
    return _Static(box_size, pixel_size, idx, k2.astype(np.float32), w.astype(np.float32), enc_input, ctf_sign,
                   win)


def _data_ft(st: _Static, images):
    """Windowed (if configured) image DFTs: full half layout and the values on K."""
    if st.window is not None:
        images = images * jnp.asarray(real_space_window(st.box_size, *st.window))
    y_full = rfft2_centered(images)
    return y_full, y_full.reshape(y_full.shape[0], -1)[:, jnp.asarray(st.k_idx)]


def encode_batch(vae: "_VAE", st: _Static, batch: "_Batch", tables: dict):
    """Posterior means and log-variances (None for the autodecoder) of a batch (no decoder)."""
    if st.enc_input is None:
        return jnp.take(tables["latent"], batch.indices, axis=0, mode="clip"), None
    y_full, y_k = _data_ft(st, batch.images)
    pose_rows = jnp.take(tables["pose"], batch.indices, axis=0, mode="clip") if "pose" in tables else None
    _, c, ph, _ = _batch_geometry(st, batch, pose_rows)
    dec = vae.decoder
    scale = dec.output_scale[...] if hasattr(dec, "output_scale") else 1.0
    return vae.encoder(_encoder_features(st, y_full, y_k, c, ph, scale))


def _batch_geometry(st: _Static, batch: _Batch, pose_rows):
    """Rotations, shifts (corrected when pose rows are given), CTF and phase on K."""
    R, s = batch.rotations, batch.shifts
    if pose_rows is not None:
        R = jnp.einsum("bij,bjk->bik", axis_angle_to_matrix(pose_rows[:, :3]), R)
        s = s + pose_rows[:, 3:5]
    D, a = st.box_size, st.pixel_size
    k2 = jnp.asarray(st.k2)
    k_phys = k2 / (D * a)
    if batch.ctf is not None:
        c = jax.vmap(lambda p: ctf_fn(p, k_phys, st.ctf_sign))(batch.ctf)
    else:
        c = jnp.ones((R.shape[0], k2.shape[0]), jnp.float32)
    ph = jax.vmap(lambda sh: shift_phase(k2, sh, D))(s)
    return R, c, ph, k_phys


def _encoder_features(st: _Static, y_full, y_k, c, ph, scale):
    """Encoder input from the data: centred (shift undone), phase-flipped, normalised."""
    if st.enc_input == "hartley":
        centred = y_k * jnp.conj(ph) * jnp.sign(c) / scale
        return jnp.concatenate([centred.real - centred.imag, centred.real + centred.imag], -1)
    # real-space inputs: build the full half grid (zero outside K, as the Hartley input)
    B = y_full.shape[0]
    D = st.box_size
    centred = jnp.zeros((B, D * (D // 2 + 1)), y_full.dtype)
    centred = centred.at[:, jnp.asarray(st.k_idx)].set(y_k * jnp.conj(ph) * jnp.sign(c) / scale)
    return encoder_input(centred.reshape(B, D, D // 2 + 1), st.enc_input, D)


def vae_loss_terms(vae: _VAE, st: _Static, batch: _Batch, key, tables: dict, noise_variance, train: bool = True):
    """Per-image negative log-likelihood, KL (or latent prior) and latents of a batch.

    Returns dict with ``nll`` [B], ``kl`` [B], ``mu`` [B, z], ``logvar`` [B, z] or None.
    """
    D = st.box_size
    y_full, y_k = _data_ft(st, batch.images)
    pose_rows = jnp.take(tables["pose"], batch.indices, axis=0, mode="clip") if "pose" in tables else None
    R, c, ph, k_phys = _batch_geometry(st, batch, pose_rows)
    dec = vae.decoder
    scale = dec.output_scale[...] if hasattr(dec, "output_scale") else 1.0
    if st.enc_input is None:  # autodecoder
        mu = jnp.take(tables["latent"], batch.indices, axis=0, mode="clip")
        logvar = None
        z = mu
        kl = 0.5 * jnp.sum(mu * mu, -1)  # -log N(mu; 0, I) + const (MAP prior)
    else:
        feats = _encoder_features(st, y_full, y_k, c, ph, scale)
        mu, logvar = vae.encoder(feats)
        if train:
            z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)
        else:
            z = mu
        kl = -0.5 * jnp.sum(1 + logvar - mu * mu - jnp.exp(logvar), -1)
    k3 = jax.vmap(lambda A: rotate_image_frequencies(k_phys, A))(R)  # [B, n_k, 3]
    F = jax.vmap(dec.fourier)(z, k3)
    model = c * ph * F
    r2 = jnp.abs(y_k - model) ** 2
    nll = 0.5 * jnp.sum(jnp.asarray(st.wts) * r2, -1) / (D * D * noise_variance)
    return dict(nll=nll, kl=kl, mu=mu, logvar=logvar)


# ----------------------------------------------------------------------------- data

def _as_source(particles, downsample: int | None):
    """A ParticleDataset / InMemoryParticles / ParticleTable / path -> a batch source."""
    if isinstance(particles, InMemoryParticles):
        if downsample and downsample != particles.image_size:
            raise JaxhetInputError("downsample: give InMemoryParticles already at the training box")
        return particles
    from jaxhet import io as jio
    if isinstance(particles, jio.ParticleDataset):
        return particles
    if isinstance(particles, jio.ParticleTable):
        return jio.ParticleDataset(particles, downsample_to=downsample)
    if isinstance(particles, (str, os.PathLike)):
        return jio.ParticleDataset(jio.read_particles(particles), downsample_to=downsample)
    raise TypeError(f"train_vae: cannot use particles of type {type(particles).__name__}")


def _intensity_scale(source) -> float:
    """Factor applied to the images before training: 1.

    ``jaxhet.io`` downsampling keeps DFT values (mass per pixel), which is what jaxhet's
    models need, so no compensation is needed; the factor is kept in the checkpoint
    metadata (``intensity_scale``) so older checkpoints, written when io kept pixel values
    and this factor was (D/D')^2, still describe their training data.
    """
    return 1.0


def _to_batch(b, n_images: int, batch_size: int, iscale: float, has_ctf: bool) -> _Batch:
    m = len(b.images)
    pad = batch_size - m

    def padded(x, fill=None):
        x = np.asarray(x)
        if pad == 0:
            return x
        extra = np.repeat(x[:1], pad, 0) if fill is None else np.full((pad, *x.shape[1:]), fill, x.dtype)
        return np.concatenate([x, extra], 0)

    imgs = np.asarray(b.images, np.float32)
    if iscale != 1.0:
        imgs = imgs * np.float32(iscale)
    rot = np.asarray(b.rotations, np.float32)
    if not np.all(np.isfinite(rot)):
        raise JaxhetInputError("particles: some poses are missing (NaN); train_vae needs known poses (--poses)")
    c = None
    if has_ctf and b.ctf is not None:
        c = CTFParams(*[padded(np.asarray(x, np.float32)) for x in b.ctf])
    w = np.zeros(batch_size, np.float32)
    w[:m] = 1
    return _Batch(padded(imgs), padded(rot), -padded(np.asarray(b.origin_in_pixels, np.float32)), c,
                  padded(np.asarray(b.indices, np.int32), fill=n_images), w)


def _has_ctf(source) -> bool:
    table = getattr(source, "table", None)
    if table is not None:
        return bool(table.has_ctf)
    return getattr(source, "ctf", None) is not None


def _sample_stats(source, iscale: float, n_max: int = 1000, seed: int = 0):
    """Per-pixel variance and RMS |Y(k)| on K of (up to) n_max images."""
    n = len(source)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, n_max), replace=False))
    imgs = np.asarray(source.get_batch(rows).images, np.float64) * iscale
    D = imgs.shape[-1]
    var = float(np.mean(np.var(imgs, axis=(-2, -1))))
    f = np.fft.rfft2(np.fft.ifftshift(imgs, axes=(-2, -1))).reshape(len(imgs), -1)[:, hartley_mask_indices(D)]
    rms = float(np.sqrt(np.mean(np.abs(f) ** 2)))
    return var, rms


# ----------------------------------------------------------------------------- checkpoints

def _flat(tree) -> list:
    return jax.tree_util.tree_leaves(tree)


def _save_checkpoint(path: str, state: VAETrainState, rest, meta: dict) -> None:
    leaves = [np.asarray(x) for x in _flat((state, rest))]
    tmp = path + ".tmp.npz"
    np.savez(tmp, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **{f"leaf{i:05d}": x for i, x in enumerate(leaves)})
    os.replace(tmp, path)


def _load_checkpoint(path: str, template_state: VAETrainState, template_rest):
    with np.load(path) as f:
        meta = json.loads(bytes(f["__meta__"]).decode())
        leaves = [f[f"leaf{i:05d}"] for i in range(len([k for k in f.files if k.startswith("leaf")]))]
    tmpl_leaves, treedef = jax.tree_util.tree_flatten((template_state, template_rest))
    if len(leaves) != len(tmpl_leaves) or any(a.shape != np.shape(b) for a, b in zip(leaves, tmpl_leaves)):
        raise JaxhetInputError(f"{path}: checkpoint does not match this model configuration")
    restored = [jnp.asarray(a, dtype=jnp.asarray(b).dtype) for a, b in zip(leaves, tmpl_leaves)]
    state, rest = jax.tree_util.tree_unflatten(treedef, restored)
    return state, rest, meta


# ----------------------------------------------------------------------------- training

def _build(cfg: VAEConfig, n_images: int, box: int, pixel_size: float, output_scale: float):
    rngs = nnx.Rngs(params=cfg.seed)
    decoder = CryoDRGNDecoder(box, pixel_size, cfg.zdim, hidden_dim=cfg.dec_dim, n_layers=cfg.dec_layers,
                              pe_type=cfg.pe_type, pe_dim=cfg.pe_dim, feat_sigma=cfg.feat_sigma,
                              output_scale=output_scale, rngs=rngs)
    encoder = None if cfg.encoder == "autodecoder" else create_encoder(
        cfg.encoder, box, cfg.zdim, cfg.enc_dim, cfg.enc_layers, rngs=rngs)
    return _VAE(encoder, decoder)


def _init_state(cfg: VAEConfig, vae: _VAE, n_images: int, tx) -> tuple:
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
    tables, table_opt = {}, {}
    if cfg.pose_refine:
        tables["pose"] = jnp.zeros((n_images, 5), jnp.float32)
    if cfg.encoder == "autodecoder":
        key = jax.random.key(cfg.seed + 7919)
        tables["latent"] = 0.1 * jax.random.normal(key, (n_images, cfg.zdim), jnp.float32)
    for name, t in tables.items():
        table_opt[name] = dict(m=jnp.zeros_like(t), v=jnp.zeros_like(t), count=jnp.zeros(t.shape[0], jnp.int32))
    state = VAETrainState(params, tx.init(params), tables, table_opt, jnp.asarray(0, jnp.int32))
    return graphdef, state, rest


_JIT_CACHE: dict = {}


def _static_key(st: _Static):
    return (st.box_size, st.pixel_size, st.enc_input, st.ctf_sign, st.window)


def _make_step(graphdef, st: _Static, tx, cfg: VAEConfig, repl, data_sh):
    """The jitted train step; cached per (architecture, grid, learning rates, mesh) so that
    repeated runs in one process (resume, tests, sweeps) compile once."""
    key_ = ("step", graphdef, _static_key(st), cfg.lr, cfg.ad_lr, cfg.pose_lr, repl.mesh)
    try:
        return _JIT_CACHE[key_]
    except (KeyError, TypeError):
        pass

    def step(state: VAETrainState, rest, batch: _Batch, key, refine_poses, noise_variance, beta):
        def loss_fn(params, tables):
            vae = nnx.merge(graphdef, params, rest)
            t = vae_loss_terms(vae, st, batch, key, tables, noise_variance, train=True)
            per = t["nll"] + beta * t["kl"]
            wsum = jnp.maximum(jnp.sum(batch.weights), 1.0)
            loss = jnp.sum(batch.weights * per) / wsum
            aux = dict(loss=loss, nll=jnp.sum(batch.weights * t["nll"]) / wsum,
                       kl=jnp.sum(batch.weights * t["kl"]) / wsum)
            return loss, aux

        (_, aux), (g_params, g_tables) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state.params, state.tables)
        updates, opt_state = tx.update(g_params, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        tables, table_opt = dict(state.tables), dict(state.table_opt)
        mask = batch.weights > 0
        wsum = jnp.maximum(jnp.sum(batch.weights), 1.0)
        for name in state.tables:
            # per-row gradient of the per-image loss (undo the batch mean)
            rows = jnp.take(g_tables[name], batch.indices, axis=0, mode="clip") * wsum
            lr = cfg.ad_lr if name == "latent" else cfg.pose_lr
            o = state.table_opt[name]
            row_mask = mask if name == "latent" else (mask & refine_poses)
            t_new, m_new, v_new, c_new = sparse_adam_update(state.tables[name], o["m"], o["v"], o["count"],
                                                            batch.indices, rows, row_mask, lr)
            tables[name] = t_new
            table_opt[name] = dict(m=m_new, v=v_new, count=c_new)
        return VAETrainState(params, opt_state, tables, table_opt, state.epoch), aux

    fn = jax.jit(step, out_shardings=(repl, repl), donate_argnums=(0,))
    try:
        _JIT_CACHE[key_] = fn
    except TypeError:  # unhashable graphdef: no caching
        pass
    return fn


def _make_encode(graphdef, st: _Static, repl):
    key_ = ("encode", graphdef, _static_key(st), repl.mesh)
    try:
        return _JIT_CACHE[key_]
    except (KeyError, TypeError):
        pass

    def enc(params, rest, tables, batch: _Batch, noise_variance=None):
        vae = nnx.merge(graphdef, params, rest)
        mu, lv = encode_batch(vae, st, batch, tables)
        return mu, (lv if lv is not None else jnp.zeros_like(mu))

    fn = jax.jit(enc, out_shardings=repl)
    try:
        _JIT_CACHE[key_] = fn
    except TypeError:
        pass
    return fn


def _shard_batch(batch: _Batch, data_sh, repl) -> _Batch:
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, data_sh), batch)


def _meta(cfg: VAEConfig, box, pixel, n, noise_variance, output_scale, iscale, epoch, order_seed_note, extra):
    return dict(format="jaxhet-vae-checkpoint-1", config=dataclasses.asdict(cfg), box_size=int(box),
                pixel_size=float(pixel), n_images=int(n), noise_variance=float(noise_variance),
                output_scale=float(output_scale), intensity_scale=float(iscale), epoch=int(epoch),
                data_order=order_seed_note, **extra)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The visiting order of the particles in (1-based) epoch ``epoch``."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def train_vae(particles, out_dir: str, config: VAEConfig | None = None, *, resume: bool = False,
              mesh: Mesh | None = None, progress: bool = True, on_step: Callable[[int, int], None] | None = None,
              write_outputs: bool = True, extra_meta: dict | None = None) -> VAEResult:
    """Train a VAE (or autodecoder) with known poses; checkpoint every epoch; resume exactly.

    Args:
        particles: a ``jaxhet.io.ParticleDataset`` / ``ParticleTable`` / particle file path,
            or :class:`InMemoryParticles`.
        out_dir: output folder (checkpoint.npz, config.json, model.npz, latents.npy, z.pkl).
        config: :class:`VAEConfig`.
        resume: continue from ``out_dir/checkpoint.npz`` (error if absent); without it an
            existing checkpoint is an error (never overwritten silently).
        mesh: a 1-D device mesh over ``"data"`` (default: all local devices).
        progress: tqdm bar (loss, images/s).
        on_step: called as ``on_step(epoch, step)`` after every step (hooks, tests).
        write_outputs: write latents / z.pkl / model at the end.

    Returns:
        :class:`VAEResult` (latents are posterior means in input particle order).

    Example:
        >>> res = train_vae("particles.star", "out", VAEConfig(zdim=8, epochs=20))
        >>> res.latents.shape  # (N, 8)
    """
    cfg = dataclasses.replace(config) if config is not None else VAEConfig()
    if cfg.ctf_sign not in ("relion", "cryodrgn"):
        raise JaxhetInputError(f"ctf_sign must be 'relion' or 'cryodrgn', got {cfg.ctf_sign!r}")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, VAE_FILES["checkpoint"])
    if os.path.exists(ckpt_path) and not resume:
        raise JaxhetInputError(f"{ckpt_path}: a checkpoint exists; resume it (--resume) or choose another output folder")
    if resume and not os.path.exists(ckpt_path):
        raise JaxhetInputError(f"{ckpt_path}: no checkpoint to resume from")
    if resume:  # the checkpoint's configuration wins (same run)
        with np.load(ckpt_path) as f:
            old = json.loads(bytes(f["__meta__"]).decode())
        oc = dict(old["config"])
        oc.setdefault("window", False)  # checkpoints from before the window option trained without it
        saved = VAEConfig(**oc)
        saved.epochs = cfg.epochs  # allow extending a finished run
        cfg = saved

    source = _as_source(particles, cfg.downsample)
    n = len(source)
    D = int(source.image_size)
    a = float(source.pixel_size_in_angstroms)
    iscale = _intensity_scale(source)
    has_ctf = _has_ctf(source)
    B = int(cfg.batch_size)
    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    if B % n_dev:
        raise JaxhetInputError(f"batch size {B} must be a multiple of the number of devices ({n_dev})")
    repl = NamedSharding(mesh, P())
    data_sh = NamedSharding(mesh, P("data"))

    if resume:
        noise_variance, out_scale = old["noise_variance"], old["output_scale"]
    else:
        var, rms = _sample_stats(source, iscale, seed=cfg.seed)
        noise_variance = var if cfg.noise_variance is None else float(cfg.noise_variance)
        out_scale = rms
    vae = _build(cfg, n, D, a, out_scale)
    tx = optax.adam(cfg.lr)
    graphdef, state, rest = _init_state(cfg, vae, n, tx)
    if resume:
        state, rest, meta = _load_checkpoint(ckpt_path, state, rest)
        if meta["n_images"] != n or meta["box_size"] != D:
            raise JaxhetInputError(f"{ckpt_path}: checkpoint is for {meta['n_images']} images of box "
                                   f"{meta['box_size']}, data has {n} of box {D}")
    state = jax.device_put(state, repl)
    rest = jax.device_put(rest, repl)
    enc_input = None if cfg.encoder == "autodecoder" else ENCODER_INPUT[cfg.encoder]
    st = _static(D, a, enc_input, cfg.ctf_sign, (cfg.window_r, cfg.window_outer) if cfg.window else None)
    step_fn = _make_step(graphdef, st, tx, cfg, repl, data_sh)
    nv = jnp.asarray(noise_variance, jnp.float32)
    beta = jnp.asarray(cfg.resolved_beta(), jnp.float32)
    base_key = jax.random.key(cfg.seed)
    history = []
    if resume and os.path.exists(os.path.join(out_dir, VAE_FILES["history"])):
        with open(os.path.join(out_dir, VAE_FILES["history"])) as f:
            history = json.load(f)[: int(state.epoch)]
    meta_extra = dict(extra_meta or {})

    enc_fn = _make_encode(graphdef, st, repl)
    start_epoch = int(state.epoch) + 1
    n_steps = -(-n // B)
    for epoch in range(start_epoch, cfg.epochs + 1):
        order = epoch_order(cfg.seed, epoch, n)
        refine = jnp.asarray(bool(cfg.pose_refine and epoch >= cfg.pose_refine_start))
        ekey = jax.random.fold_in(base_key, epoch)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n, unit="img", desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        sums = dict(loss=0.0, nll=0.0, kl=0.0)
        pending = []
        for j, b in enumerate(source.batches(B, shuffle=False, indices=order)):
            batch = _shard_batch(_to_batch(b, n, B, iscale, has_ctf), data_sh, repl)
            state, aux = step_fn(state, rest, batch, jax.random.fold_in(ekey, j), refine, nv, beta)
            pending.append((aux, len(b.images)))
            if len(pending) > 8 or j == n_steps - 1:  # fetch metrics lazily (keeps the device busy)
                for a_, m_ in pending:
                    for k_ in sums:
                        sums[k_] += float(a_[k_]) * m_
                if bar is not None:
                    done = sum(m_ for _, m_ in pending)
                    bar.update(done)
                    dt_ = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{float(pending[-1][0]['loss']):.4g}",
                                    img_s=f"{bar.n / max(dt_, 1e-9):.0f}")
                pending = []
            if on_step is not None:
                on_step(epoch, j)
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        state = state._replace(epoch=jax.device_put(jnp.asarray(epoch, jnp.int32), repl))
        rec = dict(epoch=epoch, loss=sums["loss"] / n, nll=sums["nll"] / n, kl=sums["kl"] / n,
                   seconds=dt, images_per_second=n / dt)
        history.append(rec)
        if progress:
            print(f"epoch {epoch}/{cfg.epochs}: loss {rec['loss']:.5g} (nll {rec['nll']:.5g}, kl {rec['kl']:.4g}), "
                  f"{rec['images_per_second']:.0f} images/s", flush=True)
        meta = _meta(cfg, D, a, n, noise_variance, out_scale, iscale, epoch,
                     dict(rule="numpy default_rng([seed, epoch]).permutation(n)", seed=cfg.seed,
                          last_epoch_order_head=order[:16].tolist()), meta_extra)
        if cfg.save_every and epoch % cfg.save_every == 0 and write_outputs:
            ep_dir = os.path.join(out_dir, "epochs")
            os.makedirs(ep_dir, exist_ok=True)
            mu_e, _ = encode_latents(enc_fn, state, rest, source, n, B, iscale, has_ctf, data_sh, repl)
            np.save(os.path.join(ep_dir, f"latents.{epoch}.npy"), mu_e)
            save_model(os.path.join(ep_dir, f"model.{epoch}.npz"), nnx.merge(graphdef, state.params, rest).decoder,
                       overwrite=True)
        _save_checkpoint(ckpt_path, state, rest, meta)
        with open(os.path.join(out_dir, VAE_FILES["history"]), "w") as f:
            json.dump(history, f, indent=1)

    vae = nnx.merge(graphdef, state.params, rest)
    mu, lv = encode_latents(enc_fn, state, rest, source, n, B, iscale, has_ctf,
                            data_sh, repl)
    if cfg.encoder == "autodecoder":
        lv = None
    poses = np.asarray(state.tables["pose"]) if "pose" in state.tables else None
    if write_outputs:
        _write_outputs(out_dir, cfg, vae, mu, lv, poses, dict(box_size=D, pixel_size=a, n_images=n,
                                                             noise_variance=noise_variance, output_scale=out_scale,
                                                             intensity_scale=iscale, **meta_extra), history)
    return VAEResult(vae.decoder, mu, lv, poses, history)


def encode_latents(enc_fn, state, rest, source, n, B, iscale, has_ctf, data_sh, repl):
    """Posterior means and log-variances of all particles, in input order."""
    mus, lvs = [], []
    for b in source.batches(B, shuffle=False):
        m = len(b.images)
        batch = _shard_batch(_to_batch(b, n, B, iscale, has_ctf), data_sh, repl)
        mu, lv = enc_fn(state.params, rest, state.tables, batch)
        mus.append(np.asarray(mu)[:m])
        lvs.append(np.asarray(lv)[:m])
    return np.concatenate(mus).astype(np.float32), np.concatenate(lvs).astype(np.float32)


def _write_outputs(out_dir, cfg, vae, mu, lv, poses, info, history):
    np.save(os.path.join(out_dir, VAE_FILES["latents"]), mu)
    if lv is not None:
        np.save(os.path.join(out_dir, VAE_FILES["logvar"]), lv)
    with open(os.path.join(out_dir, VAE_FILES["zpkl"]), "wb") as f:  # cryoDRGN's z.pkl: z_mu then z_logvar
        pickle.dump(mu.astype(np.float32), f)
        if lv is not None:
            pickle.dump(lv.astype(np.float32), f)
    if poses is not None:
        np.save(os.path.join(out_dir, VAE_FILES["poses"]), poses)
    save_model(os.path.join(out_dir, VAE_FILES["model"]), vae.decoder, overwrite=True)
    if vae.encoder is not None:
        from jaxhet.models import model_state_to_arrays
        np.savez(os.path.join(out_dir, VAE_FILES["encoder"]), **model_state_to_arrays(vae.encoder))
    conf = dict(kind="vae", config=dataclasses.asdict(cfg), **info,
                model_file=VAE_FILES["model"], latents_file=VAE_FILES["latents"],
                final_epoch=history[-1]["epoch"] if history else 0,
                images_per_second=float(np.median([h["images_per_second"] for h in history])) if history else None)
    with open(os.path.join(out_dir, VAE_FILES["config"]), "w") as f:
        json.dump(conf, f, indent=1)


def load_vae(out_dir: str):
    """(decoder model, config dict, latents or None) of a finished ``train_vae`` output folder."""
    cpath = os.path.join(out_dir, VAE_FILES["config"])
    if not os.path.exists(cpath):
        raise JaxhetInputError(f"{out_dir}: no {VAE_FILES['config']} (not a finished jaxhet training folder)")
    with open(cpath) as f:
        conf = json.load(f)
    model = load_model(os.path.join(out_dir, conf.get("model_file", VAE_FILES["model"])))
    lp = os.path.join(out_dir, conf.get("latents_file", VAE_FILES["latents"]))
    z = np.load(lp) if os.path.exists(lp) else None
    return model, conf, z
