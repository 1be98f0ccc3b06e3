"""Forward-model throughput: jaxhet vs cryojax vs cryoDRGN (CPU).

The work timed is the image-formation model of survey eq. (1) for a voxel map: for a batch
of images with random orientations, in-plane shifts and astigmatic CTFs (with a B-factor
envelope), slice the map's 3D Fourier transform, multiply by CTF and shift phases, and
return real-space images. Compilation is excluded (one warm-up call); each repeat times
one batch; images/s = batch / median(time). The tools are interleaved repeat by repeat so
that load from other processes affects all of them alike.

Peers (optional; skipped if not importable):

- cryojax 0.6: ``FourierVoxelGridVolume.from_real_voxel_grid`` + ``FourierSliceExtraction``
  + ``ContrastTransferTheory(AstigmaticCTF, FourierGaussian envelope)`` +
  ``QuaternionPose`` with offsets, via ``make_image_model(...).simulate()``, vmapped over
  poses and jitted (``equinox.filter_jit``). Both its ``pad_scale=1`` (default) and
  ``pad_scale=2`` (renders at a 2D box and crops: 4x the samples of jaxhet's pad 2) are
  timed.
- cryoDRGN 4.3 (torch CPU): its explicit Hartley-voxel decoder ``models_ai.VolumeExplicit``
  (``grid_sample`` trilinear) on ``Lattice`` coordinates ``coords @ R``, ``ctf.compute_ctf``,
  ``Lattice.translate_ht`` and ``fft.iht2_center``, as in cryoDRGN-AI's ``decode``.

Conventions reconciled for the image-agreement check (same pose, CTF and shift):
cryojax pose = ``QuaternionPose(wxyz=matrix_to_quaternion(A))`` (it samples the slice at
``R^T (kx, ky, 0)`` like jaxhet), offsets = jaxhet shift x pixel size, CTF sign = minus
RELION's, astigmatism angle = 90 deg - rlnDefocusAngle (it measures azimuths from the y
axis), images scaled by the pixel size. cryoDRGN: ``x = coords @ A`` (= A^T k),
``translate_ht`` with t = +shift, CTF sign = minus RELION's.

Usage:
    python experiments/bench_forward.py                      # D = 64, 128, 256
    python experiments/bench_forward.py --sizes 64 --repeats 3 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jaxhet
from jaxhet.core import (
    CTFParams, gaussian_atoms_projection, gaussian_atoms_volume, matrix_to_quaternion, prepare_volume,
    project_volume, random_rotations, render_batch, render_image, voxel_fourier_fn,
)

DEFAULT_BATCH = {64: 128, 128: 64, 256: 16}
VOLTAGE, CS, W, B_FACTOR = 300.0, 2.7, 0.1, 50.0


# ------------------------------------------------------------------------------- inputs
def make_map(D: int, pixel_size: float, seed: int = 0):
    """Gaussian-atom 'protein' filling ~40% of the box diameter; returns (map, atoms)."""
    rng = np.random.default_rng(seed)
    n = 400
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    pos = (d * rng.uniform(0, 1, (n, 1)) ** (1 / 3) * 0.2 * D * pixel_size).astype(np.float32)
    m = rng.uniform(1.0, 10.0, n).astype(np.float32)
    sig = (rng.uniform(1.0, 1.5, n) * pixel_size).astype(np.float32)
    vol = jax.jit(gaussian_atoms_volume, static_argnums=(3, 4))(pos, m, sig, D, pixel_size)
    return vol, (pos, m, sig)


def make_poses(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    R = np.asarray(random_rotations(jax.random.key(seed), n))
    shifts = rng.uniform(-5.0, 5.0, (n, 2)).astype(np.float32)
    du = rng.uniform(10000.0, 25000.0, n).astype(np.float32)
    dv = (du - rng.uniform(0.0, 2000.0, n)).astype(np.float32)
    ang = rng.uniform(-90.0, 90.0, n).astype(np.float32)
    return R, shifts, du, dv, ang


# ------------------------------------------------------------------------------- jaxhet
def jaxhet_renderer(vol, D, a, pad_factor=2):
    vft = prepare_volume(jnp.asarray(vol), pad_factor)
    jax.block_until_ready(vft.spectrum)

    @jax.jit
    def render(vft, R, shifts, du, dv, ang):
        ctf = CTFParams.create(du, dv, ang, VOLTAGE, CS, W, 0.0, B_FACTOR)
        return render_batch(voxel_fourier_fn(vft, a), R, shifts, ctf, D, a)

    return lambda R, s, du, dv, ang: render(vft, R, s, du, dv, ang)


def load_baseline_core(path: str):
    """Import another copy of jaxhet/core (e.g. an older commit, for before/after timings)
    under the module name ``jaxhet_baseline_core``; it only uses relative imports."""
    import importlib.util

    init = os.path.join(path, "__init__.py")
    spec = importlib.util.spec_from_file_location("jaxhet_baseline_core", init, submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["jaxhet_baseline_core"] = mod
    spec.loader.exec_module(mod)
    return mod


def baseline_renderer(core, vol, D, a, pad_factor=2):
    vft = core.prepare_volume(jnp.asarray(vol), pad_factor)
    jax.block_until_ready(vft.spectrum)

    @jax.jit
    def render(spectrum, R, shifts, du, dv, ang):
        v = core.VolumeFT(spectrum, D, pad_factor)
        ctf = core.CTFParams.create(du, dv, ang, VOLTAGE, CS, W, 0.0, B_FACTOR)
        return core.render_batch(core.voxel_fourier_fn(v, a), R, shifts, ctf, D, a)

    return lambda R, s, du, dv, ang: render(vft.spectrum, R, s, du, dv, ang)


# ------------------------------------------------------------------------------- cryojax
def cryojax_renderer(vol, D, a, pad_scale=1.0):
    import equinox as eqx
    import cryojax.simulator as cxs
    from cryojax.ndimage import FourierGaussian

    cx_vol = cxs.FourierVoxelGridVolume.from_real_voxel_grid(jnp.asarray(vol), pad_scale=pad_scale)
    integrator = cxs.FourierSliceExtraction()

    @eqx.filter_jit
    def render(cx_vol, wxyz, offsets, du, dv, ang):
        # built inside the trace: the config caches its frequency grids
        config = cxs.BasicImageConfig((D, D), a, VOLTAGE)

        def one(q, off, du, dv, ang):
            pose = cxs.QuaternionPose(off[0], off[1], wxyz=q)
            ctf = cxs.AstigmaticCTF((du + dv) / 2, du - dv, 90.0 - ang, CS)
            theory = cxs.ContrastTransferTheory(ctf, envelope=FourierGaussian(1.0, B_FACTOR),
                                                amplitude_contrast_ratio=W)
            return cxs.make_image_model(cx_vol, config, pose, theory, integrator).simulate()

        return jax.vmap(one)(wxyz, offsets, du, dv, ang)

    def call(R, shifts, du, dv, ang):
        q = matrix_to_quaternion(jnp.asarray(R))
        return render(cx_vol, q, jnp.asarray(shifts) * a, du, dv, ang)

    return call


# ------------------------------------------------------------------------------- cryoDRGN
def cryodrgn_renderer(vol, D, a):
    import torch
    from cryodrgn import ctf as dctf
    from cryodrgn import fft as dfft
    from cryodrgn.lattice import Lattice
    from cryodrgn.models_ai import VolumeExplicit

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lat = Lattice(D + 1, extent=0.5)
    # (D+1)^3 Hartley volume, symmetric around DC (periodic extension, as symmetrize_ht in 2D)
    ht = dfft.htn_center(torch.as_tensor(np.asarray(vol)))
    ht = torch.as_tensor(np.pad(ht.numpy(), ((0, 1),) * 3, mode="wrap"))
    model = VolumeExplicit(D + 1, "hartley", 0.5)
    with torch.no_grad():
        model.volume.copy_(ht / 1e2)  # VolumeExplicit multiplies by 1e2
    freqs = lat.freqs2d / a

    @torch.no_grad()
    def call(R, shifts, du, dv, ang):
        B = R.shape[0]
        rot = torch.as_tensor(np.ascontiguousarray(R))  # x = k @ A = A^T k
        x = lat.coords @ rot  # [B, (D+1)^2, 3]
        y = model(x, None)
        c = dctf.compute_ctf(freqs, torch.as_tensor(du)[:, None], torch.as_tensor(dv)[:, None],
                             torch.as_tensor(ang)[:, None], torch.full((B, 1), VOLTAGE), torch.full((B, 1), CS),
                             torch.full((B, 1), W), bfactor=torch.full((B, 1), B_FACTOR))
        y = lat.translate_ht(y * c, torch.as_tensor(shifts)[:, None, :])[:, 0]
        img = dfft.iht2_center(y.view(B, D + 1, D + 1)[:, :-1, :-1])
        return img

    return call


# ------------------------------------------------------------------------------- helpers
def _block(x):
    if hasattr(x, "block_until_ready"):
        return x.block_until_ready()
    return x


def corr(x, y) -> float:
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    x = x - x.mean()
    y = y - y.mean()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def agreement(renderers, vol, atoms, D, a):
    """Correlation of each tool's image with jaxhet's for identical pose/CTF/shift, and the
    relative error of the no-CTF projection vs the analytic Gaussian-atom projection."""
    R, shifts, du, dv, ang = make_poses(4, seed=7)
    out = {}
    ref = np.asarray(renderers["jaxhet"](R, shifts, du, dv, ang))
    ref1 = np.asarray(renderers["jaxhet_pad1"](R, shifts, du, dv, ang)) if "jaxhet_pad1" in renderers else None
    for name, fn in renderers.items():
        imgs = np.asarray(fn(R, shifts, du, dv, ang))
        sign = -1.0 if name.startswith(("cryojax", "cryodrgn")) else 1.0  # CTF sign convention
        out[name] = {"corr_with_jaxhet": float(np.mean([corr(sign * imgs[i], ref[i]) for i in range(len(R))]))}
        if ref1 is not None and name == "cryojax_pad1":  # the same algorithm on both sides
            out[name]["corr_with_jaxhet_pad1"] = float(np.mean([corr(sign * imgs[i], ref1[i]) for i in range(len(R))]))
            out[name]["max_abs_diff_vs_jaxhet_pad1_rel"] = float(
                np.abs(sign * imgs / a - ref1).max() / np.abs(ref1).max())
    # accuracy of the projection itself (jaxhet and cryojax: no CTF, vs analytic)
    pos, m, sig = atoms
    proj = jax.jit(jax.vmap(lambda A, s: gaussian_atoms_projection(pos, m, sig, A, D, a, s)))(R, shifts)
    vft = prepare_volume(jnp.asarray(vol))
    jh = jax.jit(jax.vmap(lambda A, s: render_image(project_volume(vft, A, s, None, a), D)))(R, shifts)
    out["jaxhet"]["proj_rel_err_vs_analytic"] = float(np.linalg.norm(jh - proj) / np.linalg.norm(proj))
    if "jaxhet_pad1" in out:
        vft1 = prepare_volume(jnp.asarray(vol), 1)
        jh1 = jax.jit(jax.vmap(lambda A, s: render_image(project_volume(vft1, A, s, None, a), D)))(R, shifts)
        out["jaxhet_pad1"]["proj_rel_err_vs_analytic"] = float(np.linalg.norm(jh1 - proj) / np.linalg.norm(proj))
    for name in list(out):
        if name.startswith("cryojax"):
            pad = 2.0 if name.endswith("pad2") else 1.0
            out[name]["proj_rel_err_vs_analytic"] = _cryojax_projection_error(vol, D, a, pad, R, shifts, proj)
    return out


def _cryojax_projection_error(vol, D, a, pad, R, shifts, proj):
    import cryojax.simulator as cxs

    cx_vol = cxs.FourierVoxelGridVolume.from_real_voxel_grid(jnp.asarray(vol), pad_scale=pad)
    config = cxs.BasicImageConfig((D, D), a, VOLTAGE)
    q = np.asarray(matrix_to_quaternion(jnp.asarray(R)))
    imgs = []
    for i in range(len(R)):
        pose = cxs.QuaternionPose(shifts[i, 0] * a, shifts[i, 1] * a, wxyz=q[i])
        model = cxs.make_image_model(cx_vol, config, pose, None, cxs.FourierSliceExtraction())
        imgs.append(np.asarray(model.simulate()) / a)
    imgs = np.stack(imgs)
    return float(np.linalg.norm(imgs - np.asarray(proj)) / np.linalg.norm(np.asarray(proj)))


def available_peers():
    peers = {}
    try:
        import cryojax  # noqa: F401
        peers["cryojax"] = cryojax.__version__
    except Exception as e:  # pragma: no cover - depends on the environment
        print(f"cryojax not importable: {e}", file=sys.stderr)
    try:
        import cryodrgn  # noqa: F401
        import torch  # noqa: F401
        peers["cryodrgn"] = cryodrgn.__version__
        peers["torch"] = torch.__version__
    except Exception as e:  # pragma: no cover
        print(f"cryodrgn not importable: {e}", file=sys.stderr)
    return peers


def bench_size(D, batch, repeats, a, peers, tools, check=True, baseline=None):
    vol, atoms = make_map(D, a)
    vol = np.asarray(vol)
    renderers = {}
    if baseline is not None:
        renderers["jaxhet_baseline"] = baseline_renderer(baseline, vol, D, a)
        renderers["jaxhet_baseline_pad1"] = baseline_renderer(baseline, vol, D, a, 1)
    if "jaxhet" in tools:
        renderers["jaxhet"] = jaxhet_renderer(vol, D, a)  # default: pad 2 + gridding correction
        renderers["jaxhet_pad1"] = jaxhet_renderer(vol, D, a, pad_factor=1)
    if "cryojax" in peers and "cryojax" in tools:
        renderers["cryojax_pad1"] = cryojax_renderer(vol, D, a, 1.0)
        renderers["cryojax_pad2"] = cryojax_renderer(vol, D, a, 2.0)
    if "cryodrgn" in peers and "cryodrgn" in tools:
        renderers["cryodrgn"] = cryodrgn_renderer(vol, D, a)
    R, shifts, du, dv, ang = make_poses(batch)
    compile_s = {}
    for name, fn in renderers.items():  # warm-up: compile
        t0 = time.perf_counter()
        _block(fn(R, shifts, du, dv, ang))
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in renderers}
    for _ in range(repeats):  # interleaved
        for name, fn in renderers.items():
            t0 = time.perf_counter()
            _block(fn(R, shifts, du, dv, ang))
            times[name].append(time.perf_counter() - t0)
    res = {}
    for name in renderers:
        med = float(np.median(times[name]))
        res[name] = {"images_per_s": batch / med, "images_per_s_best": batch / float(np.min(times[name])),
                     "median_s_per_batch": med, "times_s": times[name],
                     "first_call_s": compile_s[name]}
    if check and "jaxhet" in renderers and len(renderers) > 1:
        for name, v in agreement(renderers, vol, atoms, D, a).items():
            res[name].update(v)
    elif check and "jaxhet" in renderers:
        res["jaxhet"].update(agreement(renderers, vol, atoms, D, a)["jaxhet"])
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch per size (default 128/64/16)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tools", default="jaxhet,cryojax,cryodrgn")
    p.add_argument("--no-check", action="store_true", help="skip the image-agreement check")
    p.add_argument("--baseline-core", default=None,
                   help="directory of another jaxhet/core (e.g. `git archive <commit> jaxhet/core | tar -x -C /tmp/base`, "
                        "then /tmp/base/jaxhet/core) timed alongside, for before/after numbers")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_forward.json"))
    args = p.parse_args(argv)
    batches = args.batch or [DEFAULT_BATCH.get(D, 16) for D in args.sizes]
    tools = set(args.tools.split(","))
    peers = available_peers()
    baseline = load_baseline_core(args.baseline_core) if args.baseline_core else None
    rows, results = [], {}
    load_before = os.getloadavg()
    for D, batch in zip(args.sizes, batches):
        a = 256.0 / D  # a 256 A box at every size
        print(f"D={D} batch={batch} ...", flush=True)
        res = bench_size(D, batch, args.repeats, a, peers, tools, check=not args.no_check, baseline=baseline)
        results[str(D)] = {"batch": batch, "pixel_size": a, "tools": res}
        jh = res.get("jaxhet", {}).get("images_per_s")
        for name, r in res.items():
            rows.append((D, name, r["images_per_s"], (jh / r["images_per_s"]) if jh else float("nan"),
                         r.get("corr_with_jaxhet", float("nan")), r.get("proj_rel_err_vs_analytic", float("nan"))))
    print()
    print(f"{'D':>4} {'tool':<21} {'images/s':>10} {'jaxhet/peer':>12} {'corr w/ jaxhet':>15} {'proj err':>9}")
    for D, name, ips, ratio, c, e in rows:
        print(f"{D:>4} {name:<21} {ips:>10.1f} {ratio:>12.2f} {c:>15.5f} {e:>9.4f}")
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + (argv if argv is not None else sys.argv[1:])),
        "jaxhet": jaxhet.__version__ if hasattr(jaxhet, "__version__") else "0.1.0",
        "jax": jax.__version__, "peers": peers, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "processor": platform.processor(), "repeats": args.repeats,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "work": "voxel map (pad 2 for jaxhet) -> slice -> astigmatic CTF with B-factor -> shift -> real-space image",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
