"""Make the cryoDRGN reference fixtures in tests/data/cryodrgn/.

Writes small synthetic particle metadata files, built here from first principles (the
RELION rotation formula written out below; no jaxhet code), and runs cryoDRGN's own
command-line tools on them to get the pose/CTF pkls cryoDRGN writes:

* ``particles_31.star``: RELION 3.1, 20 particles, two optics groups (different voltage,
  Cs, amplitude contrast, pixel size), origins in A, an extra column kept as-is;
* ``particles_30.star``: RELION 3.0 (single block, rlnDetectorPixelSize/rlnMagnification,
  origins in pixels) for the same particles (one optics group);
* ``particles.cs``: cryoSPARC structured array with the SAME poses as particles_31.star,
  encoded with ``pose = rotvec(A^T)`` and ``shift = origin in pixels`` (the convention
  jaxhet documents in jaxhet/io/_cryosparc.py);
* ``cryodrgn_{star31,star30,cs}_{pose,ctf}.pkl``: what ``cryodrgn parse_pose_star``,
  ``parse_ctf_star``, ``parse_pose_csparc`` and ``parse_ctf_csparc`` write for them.

If the .cs convention were wrong, cryoDRGN's poses from the .cs would not equal its poses
from the STAR file; the script checks that they do (to float32 precision).

Usage (needs cryodrgn installed)::

    python experiments/make_cryodrgn_fixtures.py [--out tests/data/cryodrgn]
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys

import numpy as np
from scipy.spatial.transform import Rotation

N = 20
BOX = 64
OPTICS = {  # group: (name, kV, Cs mm, amplitude contrast, pixel size A)
    1: ("opticsGroup1", 300.0, 2.7, 0.1, 1.5),
    2: ("opticsGroup2", 200.0, 2.0, 0.07, 1.2),
}


def relion_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION Euler_angles2matrix (Heymann 2005), written out independently of jaxhet."""
    a, b, g = np.deg2rad(rot_deg), np.deg2rad(tilt_deg), np.deg2rad(psi_deg)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.array([[cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
                     [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
                     [sb * ca, sb * sa, cb]])


def make_particles(seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    rot = rng.uniform(-180, 180, N)
    psi = rng.uniform(-180, 180, N)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, N)))
    tilt[3], tilt[11] = 0.0, 180.0  # the poles
    euler = np.round(np.stack([rot, tilt, psi], -1), 6)
    group = np.where(np.arange(N) < 12, 1, 2)
    psize = np.array([OPTICS[g][4] for g in group])
    origin_A = np.round(rng.uniform(-9, 9, (N, 2)), 6)
    dfu = np.round(rng.uniform(9000, 25000, N), 6)
    dfv = np.round(dfu - rng.uniform(0, 800, N), 6)
    dfang = np.round(rng.uniform(-180, 180, N), 6)
    phase = np.where(group == 2, np.round(rng.uniform(0, 90, N), 6), 0.0)
    return dict(euler=euler, group=group, psize=psize, origin_A=origin_A, dfu=dfu, dfv=dfv,
                dfang=dfang, phase=phase, index=np.arange(N) % 10 + 1,
                stack=np.array([f"Extract/job007/stack_{g}.mrcs" for g in group]))


def write_star31(p: dict, path: str) -> None:
    lines = ["", "# version 30001", "", "data_optics", "", "loop_"]
    cols = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
            "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
    lines += [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for g, (name, kv, cs, w, ps) in OPTICS.items():
        lines.append(f"{name} {g} {kv:.6f} {cs:.6f} {w:.6f} {ps:.6f} {BOX} 2")
    lines += ["", "", "# version 30001", "", "data_particles", "", "loop_"]
    cols = ["rlnImageName", "rlnMicrographName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
            "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
            "rlnPhaseShift", "rlnCtfBfactor", "rlnOpticsGroup", "rlnClassNumber"]
    lines += [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for i in range(N):
        e, o = p["euler"][i], p["origin_A"][i]
        lines.append(
            f"{p['index'][i]:06d}@{p['stack'][i]} MotionCorr/job002/mic_{i // 4:03d}.mrc "
            f"{e[0]:.6f} {e[1]:.6f} {e[2]:.6f} {o[0]:.6f} {o[1]:.6f} "
            f"{p['dfu'][i]:.6f} {p['dfv'][i]:.6f} {p['dfang'][i]:.6f} {p['phase'][i]:.6f} "
            f"0.000000 {p['group'][i]} {1 + i % 3}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n\n")


def write_star30(p: dict, path: str) -> None:
    """RELION 3.0: optics of group 1 for everyone, origins in pixels."""
    _, kv, cs, w, ps = OPTICS[1]
    cols = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX",
            "rlnOriginY", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
            "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMagnification",
            "rlnDetectorPixelSize", "rlnPhaseShift"]
    lines = ["", "data_", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for i in range(N):
        e = p["euler"][i]
        o = np.round(p["origin_A"][i] / ps, 6)
        lines.append(
            f"{p['index'][i]:06d}@{p['stack'][i]} {e[0]:.6f} {e[1]:.6f} {e[2]:.6f} "
            f"{o[0]:.6f} {o[1]:.6f} {p['dfu'][i]:.6f} {p['dfv'][i]:.6f} {p['dfang'][i]:.6f} "
            f"{kv:.6f} {cs:.6f} {w:.6f} 10000.000000 {ps:.6f} 0.000000")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n\n")


def write_cs(p: dict, path: str) -> None:
    dt = np.dtype([("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"),
                   ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("blob/sign", "<f4"),
                   ("ctf/type", "S9"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"),
                   ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
                   ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
                   ("ctf/bfactor", "<f4"), ("alignments3D/split", "<u4"),
                   ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                   ("alignments3D/psize_A", "<f4"), ("alignments3D/error", "<f4")])
    cs = np.zeros(N, dtype=dt)
    rng = np.random.default_rng(11)
    cs["uid"] = rng.integers(0, 2 ** 63, N, dtype=np.uint64)
    cs["blob/path"] = [(">" if i == 0 else "") + s for i, s in enumerate(p["stack"])]
    cs["blob/idx"] = p["index"] - 1
    cs["blob/shape"] = BOX
    cs["blob/psize_A"] = p["psize"]
    cs["blob/sign"] = -1.0
    cs["ctf/type"] = b"imagectf"
    cs["ctf/exp_group_id"] = p["group"] - 1
    cs["ctf/accel_kv"] = [OPTICS[g][1] for g in p["group"]]
    cs["ctf/cs_mm"] = [OPTICS[g][2] for g in p["group"]]
    cs["ctf/amp_contrast"] = [OPTICS[g][3] for g in p["group"]]
    cs["ctf/df1_A"] = p["dfu"]
    cs["ctf/df2_A"] = p["dfv"]
    cs["ctf/df_angle_rad"] = np.deg2rad(p["dfang"])
    cs["ctf/phase_shift_rad"] = np.deg2rad(p["phase"])
    A = np.stack([relion_matrix(*e) for e in p["euler"]])
    cs["alignments3D/pose"] = Rotation.from_matrix(np.swapaxes(A, 1, 2)).as_rotvec()
    cs["alignments3D/shift"] = p["origin_A"] / p["psize"][:, None]
    cs["alignments3D/psize_A"] = p["psize"]
    cs["alignments3D/error"] = rng.uniform(0, 1, N)
    with open(path, "wb") as f:  # np.save on the file object keeps the .cs extension
        np.save(f, cs)


def run_cryodrgn(args: list[str]) -> None:
    cmd = [sys.executable, "-c", "from cryodrgn.command_line import main_commands; main_commands()"] + args
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "data", "cryodrgn"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    p = make_particles()
    star31, star30, cs = (os.path.join(out, f) for f in ("particles_31.star", "particles_30.star", "particles.cs"))
    write_star31(p, star31)
    write_star30(p, star30)
    write_cs(p, cs)
    o = lambda name: os.path.join(out, name)  # noqa: E731
    run_cryodrgn(["parse_pose_star", star31, "-o", o("cryodrgn_star31_pose.pkl")])
    run_cryodrgn(["parse_ctf_star", star31, "-o", o("cryodrgn_star31_ctf.pkl")])
    run_cryodrgn(["parse_pose_star", star30, "-o", o("cryodrgn_star30_pose.pkl"), "-D", str(BOX),
                  "--Apix", str(OPTICS[1][4])])
    run_cryodrgn(["parse_ctf_star", star30, "-o", o("cryodrgn_star30_ctf.pkl"), "-D", str(BOX),
                  "--Apix", str(OPTICS[1][4])])
    run_cryodrgn(["parse_pose_csparc", cs, "-o", o("cryodrgn_cs_pose.pkl")])
    run_cryodrgn(["parse_ctf_csparc", cs, "-o", o("cryodrgn_cs_ctf.pkl")])

    # the .cs convention check: cryoDRGN must give the same poses from the .cs and the STAR
    with open(o("cryodrgn_star31_pose.pkl"), "rb") as f:
        rot_s, trans_s = pickle.load(f)
    with open(o("cryodrgn_cs_pose.pkl"), "rb") as f:
        rot_c, trans_c = pickle.load(f)
    d_rot = np.abs(np.asarray(rot_s) - np.asarray(rot_c)).max()
    d_trans = np.abs(np.asarray(trans_s) - np.asarray(trans_c)).max()
    print(f"cryoDRGN poses from .cs vs from STAR: max |d rot| = {d_rot:.2e}, max |d trans| = {d_trans:.2e}")
    assert d_rot < 1e-5 and d_trans < 1e-6, "the .cs pose convention disagrees with cryoDRGN"
    for fn in sorted(os.listdir(out)):
        print(f"{os.path.getsize(os.path.join(out, fn)):6d}  {fn}")


if __name__ == "__main__":
    main()
