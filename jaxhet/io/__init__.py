"""File input/output: MRC maps and stacks, RELION STAR, cryoSPARC .cs, cryoDRGN pkls,
the ParticleTable that holds particle metadata in one set of units, and a streaming
ParticleDataset that reads images in batches.

Conventions (see CONVENTIONS.md): RELION Euler angles and matrix A; origins in pixels
with RELION's sign (particle centre = box centre - origin); CTF in RELION's convention.
Every bad input raises :class:`jaxhet._errors.JaxhetInputError` naming the file.
"""

from jaxhet.io._cryodrgn import (apply_cryodrgn_ctf, apply_cryodrgn_poses, read_ctf_pkl,
                                 read_poses_pkl, table_from_cryodrgn, table_to_cryodrgn_ctf,
                                 table_to_cryodrgn_poses, write_ctf_pkl, write_poses_pkl)
from jaxhet.io._cryosparc import cs_pose_to_relion, read_cs, relion_to_cs_pose, write_cs
from jaxhet.io._dataset import ParticleBatch, ParticleDataset, fourier_downsample
from jaxhet.io._mrc import (MRCStack, StackWriter, create_stack, open_stack, read_mrc,
                            read_mrc_header, write_mrc, write_stack)
from jaxhet.io._particles import read_particles
from jaxhet.io._star import read_star, write_star
from jaxhet.io._table import ParticleTable

__all__ = [
    "read_mrc", "write_mrc", "read_mrc_header", "open_stack", "write_stack", "create_stack",
    "MRCStack", "StackWriter",
    "ParticleTable",
    "read_star", "write_star",
    "read_cs", "write_cs", "cs_pose_to_relion", "relion_to_cs_pose",
    "read_poses_pkl", "write_poses_pkl", "read_ctf_pkl", "write_ctf_pkl",
    "table_to_cryodrgn_poses", "table_to_cryodrgn_ctf", "table_from_cryodrgn",
    "apply_cryodrgn_poses", "apply_cryodrgn_ctf",
    "read_particles",
    "ParticleDataset", "ParticleBatch", "fourier_downsample",
]
