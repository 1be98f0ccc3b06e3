"""Simulated particle images with ground truth (survey eq. 1).

For every image: a conformation (frame of a trajectory, uniform or with a given
population), a uniformly random orientation (rot, psi uniform on [-180, 180),
cos(tilt) uniform on [-1, 1]), a RELION origin uniform in [-max_shift, max_shift] px, a CTF
(defocus U uniform over a range, astigmatism, angle), an optional B-factor envelope, and
white Gaussian noise at a given SNR = var(clean images) / sigma^2 (variance over whole
boxes, CryoBench's definition).

Ground-truth maps are Gaussian-atom maps (``jaxhet.core.gaussian_atoms_volume``); images are
their CTF'd, shifted projections through the same Fourier core that reconstructs them
(pad 2, gridding-corrected trilinear slicing: < 1% from the analytic projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxhet.core import (CTFParams, euler_to_matrix, gaussian_atoms_volume, prepare_volume, project_volume,
                         render_image, origin_to_shift)

from ._structures import Structure

__all__ = ["SimulationParams", "SimulatedMetadata", "sample_metadata", "ground_truth_map", "render_clean_images",
           "simulate_images"]


@dataclass
class SimulationParams:
    """Everything that defines a simulated dataset (written to sim_config.json)."""

    n_images: int = 1000
    box_size: int = 64
    pixel_size: float = 2.0
    snr: float = 0.1
    atom_sigma_in_angstroms: float | None = None  # default: the pixel size
    defocus_min_in_angstroms: float = 10000.0
    defocus_max_in_angstroms: float = 25000.0
    astigmatism_max_in_angstroms: float = 500.0
    voltage_in_kilovolts: float = 300.0
    spherical_aberration_in_mm: float = 2.7
    amplitude_contrast: float = 0.1
    b_factor_in_angstroms2: float = 0.0
    max_shift_in_pixels: float = 0.0
    frames: list[int] | None = None          # restrict to these frames (default: all)
    population: list[float] | None = None    # weights over the chosen frames (default uniform)
    seed: int = 0

    def sigma(self) -> float:
        return float(self.atom_sigma_in_angstroms or self.pixel_size)


@dataclass
class SimulatedMetadata:
    """Per-image ground truth: [N] labels (frame index), [N, 3] Euler (deg), [N, 2] origin (px), CTF."""

    labels: np.ndarray
    euler_in_degrees: np.ndarray
    origin_in_pixels: np.ndarray
    ctf: CTFParams  # numpy arrays [N]


def sample_metadata(params: SimulationParams, n_frames: int) -> SimulatedMetadata:
    """Draw conformations, poses, shifts and CTFs (numpy RNG seeded by params.seed)."""
    rng = np.random.default_rng(params.seed)
    n = params.n_images
    frames = np.arange(n_frames) if params.frames is None else np.asarray(params.frames, int)
    if params.population is None:
        p = np.full(len(frames), 1.0 / len(frames))
    else:
        p = np.asarray(params.population, float)
        if p.shape != frames.shape or np.any(p < 0) or p.sum() <= 0:
            raise ValueError("population must give one non-negative weight per frame")
        p = p / p.sum()
    labels = rng.choice(frames, size=n, p=p)
    rot = rng.uniform(-180, 180, n)
    psi = rng.uniform(-180, 180, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, n)))
    euler = np.stack([rot, tilt, psi], -1).astype(np.float32)
    origin = rng.uniform(-params.max_shift_in_pixels, params.max_shift_in_pixels, (n, 2)).astype(np.float32)
    du = rng.uniform(params.defocus_min_in_angstroms, params.defocus_max_in_angstroms, n)
    dv = du - rng.uniform(0, params.astigmatism_max_in_angstroms, n)
    ang = rng.uniform(0, 180, n)
    f = lambda v: np.full(n, v, np.float32)  # noqa: E731
    ctf = CTFParams(du.astype(np.float32), dv.astype(np.float32), ang.astype(np.float32), f(params.voltage_in_kilovolts),
                    f(params.spherical_aberration_in_mm), f(params.amplitude_contrast), f(0.0),
                    f(params.b_factor_in_angstroms2))
    return SimulatedMetadata(labels.astype(np.int32), euler, origin, ctf)


def ground_truth_map(structure: Structure, frame: int, box_size: int, pixel_size: float,
                     atom_sigma_in_angstroms: float | None = None) -> np.ndarray:
    """The ground-truth map [D, D, D] (mass per voxel) of one frame."""
    sigma = float(atom_sigma_in_angstroms or pixel_size)
    v = gaussian_atoms_volume(jnp.asarray(structure.coords_in_angstroms[frame]), jnp.asarray(structure.masses),
                              sigma, box_size, pixel_size)
    return np.asarray(v, np.float32)


@partial(jax.jit, static_argnames=("box_size", "pad_factor"))
def _render_chunk(spectrum, rotations, origins, ctf: CTFParams, pixel_size, box_size: int, pad_factor: int):
    from jaxhet.core import VolumeFT
    vft = VolumeFT(spectrum, box_size, pad_factor)

    def one(R, o, c):
        return render_image(project_volume(vft, R, origin_to_shift(o), c, pixel_size), box_size)

    return jax.vmap(one)(rotations, origins, ctf)


def render_clean_images(volume: np.ndarray, euler_in_degrees: np.ndarray, origin_in_pixels: np.ndarray,
                        ctf: CTFParams, pixel_size: float, chunk: int = 256) -> np.ndarray:
    """Noise-free CTF'd, shifted projections of one map, [n, D, D] float32."""
    D = volume.shape[-1]
    vft = prepare_volume(jnp.asarray(volume), 2, True)
    n = len(euler_in_degrees)
    out = np.empty((n, D, D), np.float32)
    for s in range(0, n, chunk):
        e = slice(s, min(n, s + chunk))
        m = e.stop - e.start
        bucket = 16
        while bucket < m:  # pad to a power of two: few compiled shapes
            bucket *= 2
        pad = bucket - m
        idx = np.concatenate([np.arange(e.start, e.stop), np.full(pad, e.start)])
        R = euler_to_matrix(jnp.asarray(euler_in_degrees[idx]))
        c = CTFParams(*[jnp.asarray(np.asarray(x)[idx]) for x in ctf])
        imgs = _render_chunk(vft.spectrum, R, jnp.asarray(origin_in_pixels[idx]), c, pixel_size, D, vft.pad_factor)
        out[s:e.stop] = np.asarray(imgs)[:m]
    return out


def simulate_images(structure: Structure, params: SimulationParams, out: np.ndarray | None = None,
                    progress=None) -> tuple[np.ndarray, SimulatedMetadata, float]:
    """Simulate a particle stack.

    Args:
        structure: atoms and frames.
        params: the dataset definition.
        out: optional preallocated (e.g. memory-mapped) [N, D, D] float32 array to fill.
        progress: optional callable(n_done) for progress reporting.

    Returns:
        ``(images [N, D, D], metadata, noise_sigma)``.
    """
    meta = sample_metadata(params, structure.n_frames)
    N, D = params.n_images, params.box_size
    images = np.empty((N, D, D), np.float32) if out is None else out
    s1 = s2 = 0.0
    for frame in np.unique(meta.labels):
        idx = np.nonzero(meta.labels == frame)[0]
        vol = ground_truth_map(structure, int(frame), D, params.pixel_size, params.sigma())
        ctf = CTFParams(*[np.asarray(x)[idx] for x in meta.ctf])
        clean = render_clean_images(vol, meta.euler_in_degrees[idx], meta.origin_in_pixels[idx], ctf, params.pixel_size)
        images[idx] = clean
        s1 += float(clean.astype(np.float64).sum())
        s2 += float((clean.astype(np.float64) ** 2).sum())
        if progress is not None:
            progress(len(idx))
    npix = N * D * D
    var = s2 / npix - (s1 / npix) ** 2
    sigma = float(np.sqrt(var / params.snr)) if params.snr and params.snr > 0 else 0.0
    if sigma > 0:
        rng = np.random.default_rng(params.seed + 1)
        for s in range(0, N, 1024):
            e = min(N, s + 1024)
            images[s:e] = images[s:e] + rng.normal(0.0, sigma, (e - s, D, D)).astype(np.float32)
    return images, meta, sigma
