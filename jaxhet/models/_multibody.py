"""The multi-body model: a molecule made of rigid bodies, each moving relative to a
consensus (Nakane et al. 2018; survey §2.3).

Body b is a map ``V_b`` (the consensus map times a soft mask, in the consensus frame) with
a rotation centre ``c_b`` (its centre of mass). Its conformation is a rigid motion
``tau_b = (omega_b, t_b)``: rotation vector ``omega_b`` (axis times angle, DEGREES) about
``c_b`` and translation ``t_b`` (A). The moved body is

    V_b'(r) = V_b( R_b^T (r - c_b - t_b) + c_b ),   R_b = exp([omega_b]_x)

whose transform is (k in 1/A; jaxhet's DFT sign ``exp(-2 pi i k . r)``)

    F_b'(k) = exp(-2 pi i k . (c_b + t_b - R_b c_b)) F_b(R_b^T k),

and the hyper-molecule is the sum over bodies (tau = all bodies' motions, flattened
``[n_bodies * 6]``: omega_x, omega_y, omega_z, t_x, t_y, t_z per body)::

    V(tau, k) = sum_b F_b'(k).

Projected at orientation A, body b therefore looks like the body map seen at the
effective orientation ``A R_b`` and shifted in-plane by ``(A (c_b + t_b - R_b c_b))_xy``
(:meth:`MultiBodyModel.body_image_poses`), which is how multi-body refinement backprojects
each body. ``F_b`` is the gridding-corrected, zero-padded spectrum of the body map sampled
by trilinear interpolation (as :class:`jaxhet.models.VoxelModel`).

Reference: Nakane, Kimanius, Lindahl & Scheres (2018) eLife 7:e36861 (multi-body
refinement in RELION).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxhet.core import axis_angle_to_matrix, gather_trilinear, prepare_volume

from ._base import HyperMolecule, register_model

__all__ = ["MultiBodyModel", "rigid_body_fourier", "motion_matrices", "body_centers"]


def motion_matrices(rotvec_in_degrees):
    """Rotation vectors (degrees) [..., 3] -> matrices [..., 3, 3] (Rodrigues, smooth at 0)."""
    return axis_angle_to_matrix(jnp.deg2rad(jnp.asarray(rotvec_in_degrees)))


def rigid_body_fourier(spectrum, pad_factor: int, pixel_size: float, center_in_angstroms, rotvec_in_degrees,
                       translation_in_angstroms, k):
    """DFT of one rigidly moved body at 3D frequencies k (1/A).

    Args:
        spectrum: [P, P, P] prepared body map (``prepare_volume(V_b, pad_factor).spectrum``).
        pad_factor: its padding; pixel_size: its voxel size (A).
        center_in_angstroms: [3] rotation centre c (x, y, z from the box centre).
        rotvec_in_degrees: [3] omega; translation_in_angstroms: [3] t.
        k: [..., 3] frequencies (1/A).

    Returns:
        complex [...]: ``exp(-2 pi i k.(c + t - R c)) F(R^T k)``.
    """
    k = jnp.asarray(k)
    P = spectrum.shape[-1]
    R = motion_matrices(rotvec_in_degrees)
    c = jnp.asarray(center_in_angstroms)
    q = k @ R  # (R^T k) for every k
    F = gather_trilinear(spectrum, q * (P * pixel_size))
    d = c + jnp.asarray(translation_in_angstroms) - R @ c
    return F * jnp.exp(-2j * jnp.pi * (k @ d))


def body_centers(body_maps, pixel_size: float) -> np.ndarray:
    """Centre of mass (x, y, z in A from the box centre D//2) of each body map [B, D, D, D]
    (negative densities ignored)."""
    v = np.maximum(np.asarray(body_maps, np.float64), 0)
    D = v.shape[-1]
    f = (np.arange(D) - D // 2) * pixel_size
    out = []
    for m in v:
        s = m.sum()
        if s <= 0:
            out.append(np.zeros(3))
            continue
        out.append([(m.sum((0, 1)) * f).sum() / s, (m.sum((0, 2)) * f).sum() / s, (m.sum((1, 2)) * f).sum() / s])
    return np.asarray(out, np.float32)


def _example(rngs):
    """Two Gaussian blobs, one per body, in an 8^3 box of 3 A voxels (pad 4 as the voxel example)."""
    D, a = 8, 3.0
    f = np.arange(D) - D // 2
    z, y, x = np.meshgrid(f, f, f, indexing="ij")
    b1 = np.exp(-((x + 1.5) ** 2 + y ** 2 + z ** 2) / 2.0) \
        + 0.3 * np.exp(-((x + 1) ** 2 + (y - 1.5) ** 2 + z ** 2) / 1.5)
    b2 = np.exp(-((x - 1.5) ** 2 + (y - 0.5) ** 2 + (z + 0.5) ** 2) / 2.5)
    maps = np.stack([b1, b2]).astype(np.float32)
    maps = maps + 0.001 * np.asarray(jax.random.normal(rngs.params(), maps.shape))
    return MultiBodyModel(D, a, n_bodies=2, pad_factor=4, body_maps=maps, rngs=rngs)


@register_model("multibody", example=_example)
class MultiBodyModel(HyperMolecule):
    """Sum of rigidly moving bodies (see module docstring); ``latent_dim = 6 n_bodies``.

    Args:
        box_size: D; pixel_size: A/voxel.
        n_bodies: number of bodies.
        latent_dim: must be ``6 * n_bodies`` if given.
        pad_factor: spectrum oversampling for off-grid values.
        body_maps: optional initial [n_bodies, D, D, D] maps (e.g. consensus x masks).
        centers_in_angstroms: optional [n_bodies, 3] rotation centres (default: each body
            map's centre of mass).
        rngs: nnx random streams.

    Example:
        >>> m = MultiBodyModel.from_consensus(consensus, masks, pixel_size=4.0)
        >>> tau = jnp.zeros(m.latent_dim).at[6 + 2].set(10.0)   # body 2: 10 deg about z
        >>> vol = m.volume(tau)
    """

    def __init__(self, box_size: int, pixel_size: float, n_bodies: int = 2, latent_dim: int | None = None,
                 pad_factor: int = 2, body_maps=None, centers_in_angstroms=None, *, rngs: nnx.Rngs):
        n_bodies = int(n_bodies)
        if latent_dim is not None and int(latent_dim) != 6 * n_bodies:
            raise ValueError(f"MultiBodyModel: latent_dim must be 6 * n_bodies = {6 * n_bodies}")
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self.n_bodies = n_bodies
        self.latent_dim = 6 * n_bodies
        self.pad_factor = int(pad_factor)
        D = self.box_size
        maps = np.zeros((n_bodies, D, D, D), np.float32) if body_maps is None else \
            np.asarray(body_maps, np.float32).reshape(n_bodies, D, D, D)
        self.body_maps = nnx.Param(jnp.asarray(maps))
        c = body_centers(maps, self.pixel_size) if centers_in_angstroms is None else \
            np.asarray(centers_in_angstroms, np.float32).reshape(n_bodies, 3)
        self.centers = nnx.Variable(jnp.asarray(c, jnp.float32))

    @classmethod
    def from_consensus(cls, consensus, masks, pixel_size: float, pad_factor: int = 2,
                       rngs: nnx.Rngs | None = None) -> "MultiBodyModel":
        """Bodies = consensus map x each (soft) mask [n_bodies, D, D, D]; centres of mass."""
        masks = np.asarray(masks, np.float32)
        maps = np.asarray(consensus, np.float32)[None] * masks
        return cls(masks.shape[-1], pixel_size, n_bodies=len(masks), pad_factor=pad_factor, body_maps=maps,
                   rngs=rngs or nnx.Rngs(0))

    def config(self) -> dict:
        return dict(box_size=self.box_size, pixel_size=self.pixel_size, n_bodies=self.n_bodies,
                    latent_dim=self.latent_dim, pad_factor=self.pad_factor)

    def spectra(self):
        """Prepared spectra of the body maps, [n_bodies, P, P, P]."""
        return jax.vmap(lambda v: prepare_volume(v, self.pad_factor).spectrum)(self.body_maps[...])

    def body_fourier(self, tau, k):
        """Per-body transforms [n_bodies, ...] at conformation tau and frequencies k (1/A)."""
        t = jnp.asarray(tau).reshape(self.n_bodies, 6)
        sp = self.spectra()
        return jax.vmap(lambda s, c, tb: rigid_body_fourier(s, self.pad_factor, self.pixel_size, c, tb[:3], tb[3:], k))(
            sp, self.centers[...], t)

    def fourier(self, tau, k):
        return jnp.sum(self.body_fourier(tau, k), axis=0)

    def volume(self, tau, box_size=None, pixel_size=None):
        """Real map at tau: inverse DFT of :meth:`fourier` on the grid (body spectra prepared
        once, then one z-plane of frequencies at a time)."""
        from jaxhet.core import frequency_grid_3d, ifft3_centered
        D = self.box_size if box_size is None else int(box_size)
        a = self.pixel_size if pixel_size is None else float(pixel_size)
        k = jnp.asarray(frequency_grid_3d(D, a))
        t = jnp.asarray(tau).reshape(self.n_bodies, 6)
        sp = self.spectra()
        cen = self.centers[...]

        def plane(kz):
            return jnp.sum(jax.vmap(lambda s, c, tb: rigid_body_fourier(s, self.pad_factor, self.pixel_size, c, tb[:3],
                                                                         tb[3:], kz))(sp, cen, t), axis=0)

        return ifft3_centered(jax.lax.map(plane, k)).real.astype(jnp.float32)

    def body_image_poses(self, tau, rotation, shift_in_pixels=None):
        """Effective image pose of every body: rotations ``A R_b`` [n_bodies, 3, 3] and
        in-plane shifts ``s + (A (c_b + t_b - R_b c_b))_xy / a`` [n_bodies, 2] (px)."""
        return body_image_poses(jnp.asarray(tau).reshape(self.n_bodies, 6), self.centers[...], rotation,
                                shift_in_pixels, self.pixel_size)


def body_image_poses(motions, centers, rotation, shift_in_pixels, pixel_size: float):
    """Effective pose of bodies with motions [n_bodies, 6] (deg, A) seen at orientation A.

    Returns (rotations [n_bodies, 3, 3] = A R_b, shifts [n_bodies, 2] px).
    """
    R = motion_matrices(motions[:, :3])
    d = centers + motions[:, 3:] - jnp.einsum("bij,bj->bi", R, centers)  # [n_bodies, 3]
    A = jnp.asarray(rotation)
    rot = jnp.einsum("ij,bjk->bik", A, R)
    s = (d @ A.T)[:, :2] / pixel_size
    if shift_in_pixels is not None:
        s = s + jnp.asarray(shift_in_pixels)[None]
    return rot, s


__all__ += ["body_image_poses"]
