"""Write a simulated dataset to disk in the formats users already have."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxhet._errors import JaxhetInputError

from ._simulate import SimulationParams, ground_truth_map, simulate_images
from ._structures import Structure, load_structure

__all__ = ["simulate_dataset", "SimulatedDataset", "OUTPUT_FILES"]

OUTPUT_FILES = ("particles.mrcs", "particles.star", "poses.pkl", "ctf.pkl", "labels.npy", "sim_config.json",
                "particles.png", "gt")


@dataclasses.dataclass
class SimulatedDataset:
    """Paths of a written simulation (all inside ``out_dir``)."""

    out_dir: str
    stack: str
    star: str
    poses_pkl: str
    ctf_pkl: str
    labels: str
    gt_dir: str
    noise_sigma: float
    gt_frames: list[int]

    def gt_map_path(self, frame: int) -> str:
        return os.path.join(self.gt_dir, f"frame_{frame:03d}.mrc")


def simulate_dataset(out_dir: str, structure: str | Structure = "adk-transition",
                     params: SimulationParams | None = None, gt_maps: str = "used", overwrite: bool = False,
                     progress: bool = False) -> SimulatedDataset:
    """Simulate particles and write them with their ground truth.

    Writes into ``out_dir``: ``particles.mrcs`` (float32 stack), ``particles.star``
    (RELION 3.1: optics + particles blocks, origins in A), ``poses.pkl`` and ``ctf.pkl``
    (cryoDRGN), ``labels.npy`` ([N] frame index of each image), ``gt/frame_XXX.mrc``
    (ground-truth maps: ``used`` frames, ``all`` frames or ``none``), ``sim_config.json``
    and ``particles.png`` (the first 16 particles).

    Refuses to write into an ``out_dir`` that already holds any of these files unless
    ``overwrite`` is set.
    """
    from jaxhet.analysis import save_particle_montage
    from jaxhet.io import ParticleTable, write_ctf_pkl, write_mrc, write_poses_pkl, write_stack, write_star
    from jaxhet.io import table_to_cryodrgn_ctf, table_to_cryodrgn_poses

    params = params or SimulationParams()
    st = load_structure(structure) if isinstance(structure, str) else structure
    if gt_maps not in ("used", "all", "none"):
        raise JaxhetInputError(f"gt_maps must be 'used', 'all' or 'none', got {gt_maps!r}")
    if params.box_size * params.pixel_size < 2 * st.radius_in_angstroms:
        raise JaxhetInputError(
            f"{st.name}: box {params.box_size} x {params.pixel_size} A = {params.box_size * params.pixel_size:.0f} A "
            f"is smaller than the molecule ({2 * st.radius_in_angstroms:.0f} A across)")
    if params.frames is not None and (min(params.frames) < 0 or max(params.frames) >= st.n_frames):
        raise JaxhetInputError(f"{st.name}: frames must lie in [0, {st.n_frames - 1}]")
    os.makedirs(out_dir, exist_ok=True)
    clash = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, f))]
    if clash and not overwrite:
        raise JaxhetInputError(f"{out_dir}: already holds {', '.join(clash)} (use --force to overwrite)")

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=params.n_images, desc="simulate", unit="img")
    images, meta, sigma = simulate_images(st, params, progress=bar.update if bar else None)
    if bar:
        bar.close()

    j = lambda name: os.path.join(out_dir, name)  # noqa: E731
    write_stack(j("particles.mrcs"), images, params.pixel_size, overwrite=overwrite)
    c = meta.ctf
    table = ParticleTable.create(
        os.path.abspath(j("particles.mrcs")), np.arange(params.n_images), euler_in_degrees=meta.euler_in_degrees,
        origin_in_pixels=meta.origin_in_pixels, defocus_u_in_angstroms=c.defocus_u_in_angstroms,
        defocus_v_in_angstroms=c.defocus_v_in_angstroms, defocus_angle_in_degrees=c.defocus_angle_in_degrees,
        phase_shift_in_degrees=c.phase_shift_in_degrees, b_factor_in_angstroms2=c.b_factor_in_angstroms2,
        voltage_in_kilovolts=params.voltage_in_kilovolts, spherical_aberration_in_mm=params.spherical_aberration_in_mm,
        amplitude_contrast=params.amplitude_contrast, pixel_size_in_angstroms=params.pixel_size,
        box_size=params.box_size, filename=j("particles.star"))
    write_star(j("particles.star"), table, version="3.1", overwrite=overwrite)
    rot, trans = table_to_cryodrgn_poses(table)
    write_poses_pkl(j("poses.pkl"), rot, trans, overwrite=overwrite)
    write_ctf_pkl(j("ctf.pkl"), table_to_cryodrgn_ctf(table), overwrite=overwrite)
    np.save(j("labels.npy"), meta.labels)

    gt_dir = j("gt")
    os.makedirs(gt_dir, exist_ok=True)
    frames = {"used": sorted(set(int(x) for x in meta.labels)), "all": list(range(st.n_frames)), "none": []}[gt_maps]
    for f in frames:
        vol = ground_truth_map(st, f, params.box_size, params.pixel_size, params.sigma())
        write_mrc(os.path.join(gt_dir, f"frame_{f:03d}.mrc"), vol, params.pixel_size, overwrite=True)

    config = dataclasses.asdict(params)
    config.update(structure=st.name, n_frames=st.n_frames, noise_sigma=sigma,
                  atom_sigma_in_angstroms=params.sigma(), ctf_sign="relion",
                  normalisation="images = sum of mass-per-voxel map along z (jaxhet convention)")
    with open(j("sim_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    save_particle_montage(images[:16], j("particles.png"), titles=[f"frame {x}" for x in meta.labels[:16]],
                          title=f"{st.name}: SNR {params.snr}, D={params.box_size}, {params.pixel_size} A/px")
    return SimulatedDataset(out_dir, j("particles.mrcs"), j("particles.star"), j("poses.pkl"), j("ctf.pkl"),
                            j("labels.npy"), gt_dir, sigma, frames)
