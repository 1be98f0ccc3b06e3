"""``jaxhet analyze OUT``: latent-space analysis of a training run (survey §9.4).

Writes to ``OUT/analyze`` (or ``-o DIR``):

- ``pca.png``, ``pca.npy`` (PC projections), ``umap.png``, ``umap.npy`` (when
  ``umap-learn`` is installed; otherwise ``summary.json`` says so);
- ``kmeans/centers.npy`` (on-data centres), ``kmeans/labels.npy``, ``kmeans/vol_XX.mrc``
  (the decoder's map at each centre);
- ``trajectory/latents.npy``, ``trajectory/vol_XX.mrc``: a map series along the data
  between two latents (shortest path on a kNN graph, resampled evenly by arc length);
  by default from the data point at the 2nd to the one at the 98th percentile of PC1;
- ``landscape.png``: -log density on (PC1, PC2) with the trajectory;
- ``summary.json``: explained variance, k-means sizes, trajectory indices, file list.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxhet._errors import JaxhetInputError

__all__ = ["register", "run", "analyze_run"]


def _parse_point(text: str | None, z: np.ndarray, pcs) -> np.ndarray | None:
    """'idx:123' (a particle), 'pc1:0.02' (percentile along PC1) or 'a,b,c,...' (a latent)."""
    if text is None:
        return None
    t = text.strip()
    if t.startswith("idx:"):
        i = int(t[4:])
        if not 0 <= i < len(z):
            raise JaxhetInputError(f"trajectory point {t}: index out of range (0..{len(z) - 1})")
        return z[i]
    if t.startswith("pc1:"):
        q = float(t[4:])
        i = int(np.argmin(np.abs(pcs.projections[:, 0] - np.quantile(pcs.projections[:, 0], q))))
        return z[i]
    try:
        v = np.asarray([float(x) for x in t.split(",")], np.float32)
    except ValueError:
        raise JaxhetInputError(f"trajectory point {t!r}: expected idx:N, pc1:Q or comma-separated numbers") from None
    if v.shape != (z.shape[1],):
        raise JaxhetInputError(f"trajectory point {t!r}: needs {z.shape[1]} numbers")
    return v


def analyze_run(out: str, outdir: str | None = None, k: int = 8, n_traj: int = 10, knn: int = 10,
                start: str | None = None, end: str | None = None, do_umap: bool = True, maps: bool = True,
                latents_path: str | None = None, labels=None, force: bool = False, seed: int = 0) -> dict:
    """Everything ``jaxhet analyze`` does; returns the summary dict."""
    from jaxhet import analysis as A
    from jaxhet import io as jio
    from jaxhet.inference import load_vae
    from jaxhet.cli._evalvol import maps_at_latents, _data_geometry
    model, conf, z = load_vae(out)
    if latents_path is not None:
        z = np.load(latents_path)
    if z is None:
        raise JaxhetInputError(f"{out}: no latents.npy")
    z = np.asarray(z, np.float32)
    outdir = outdir or os.path.join(out, "analyze")
    if os.path.exists(os.path.join(outdir, "summary.json")) and not force:
        raise JaxhetInputError(f"{outdir}: already analysed (use --force to overwrite)")
    os.makedirs(outdir, exist_ok=True)
    D, a = _data_geometry(conf)
    summary: dict = dict(n_images=int(len(z)), zdim=int(z.shape[1]), files=[])

    def f(*p):
        path = os.path.join(outdir, *p)
        summary["files"].append(os.path.relpath(path, outdir))
        return path

    pcs = A.pca(z)
    np.save(f("pca.npy"), pcs.projections)
    summary["pca_explained_variance_ratio"] = pcs.explained_variance_ratio.tolist()
    xy = pcs.projections[:, :2] if z.shape[1] > 1 else np.stack([pcs.projections[:, 0], np.zeros(len(z))], 1)

    km = A.kmeans(z, min(k, len(z)), seed=seed)
    os.makedirs(os.path.join(outdir, "kmeans"), exist_ok=True)
    np.save(f("kmeans", "centers.npy"), km.on_data_centers)
    np.save(f("kmeans", "labels.npy"), km.labels)
    np.save(f("kmeans", "center_indices.npy"), km.center_indices)
    summary["kmeans_sizes"] = np.bincount(km.labels, minlength=len(km.centers)).tolist()

    p0 = _parse_point(start, z, pcs)
    p1 = _parse_point(end, z, pcs)
    if p0 is None:
        p0 = _parse_point("pc1:0.02", z, pcs)
    if p1 is None:
        p1 = _parse_point("pc1:0.98", z, pcs)
    traj = A.graph_path(z, p0, p1, k=knn)
    tz = A.resample_path(traj.latents, n_traj)
    os.makedirs(os.path.join(outdir, "trajectory"), exist_ok=True)
    np.save(f("trajectory", "latents.npy"), tz)
    np.save(f("trajectory", "path_indices.npy"), traj.indices)
    summary["trajectory"] = dict(start_index=int(traj.indices[0]), end_index=int(traj.indices[-1]),
                                 n_path_points=int(len(traj.indices)), length=traj.length, n_maps=int(n_traj))
    txy = (tz - pcs.mean) @ pcs.components[:2].T if z.shape[1] > 1 else None
    cxy = (km.on_data_centers - pcs.mean) @ pcs.components[:2].T if z.shape[1] > 1 else None

    A.plot_latents(xy, f("pca.png"), f"PCA of latents ({100 * pcs.explained_variance_ratio[:2].sum():.0f}% var.)",
                   points=cxy, trajectory=txy)
    if labels is not None:
        A.plot_latents(xy, f("pca_labels.png"), "PCA coloured by label", color=labels, color_label="label")
    land = A.latent_landscape(xy)
    A.plot_landscape(land, f("landscape.png"), trajectory=txy)
    if do_umap and A.HAVE_UMAP and len(z) >= 20:
        emb = A.umap_embedding(z, seed=seed)
        np.save(f("umap.npy"), emb)
        A.plot_latents(emb, f("umap.png"), "UMAP of latents", xlabel="UMAP1", ylabel="UMAP2")
        summary["umap"] = "umap.png"
    else:
        summary["umap"] = "not computed: " + ("umap-learn is not installed" if not A.HAVE_UMAP else
                                              "disabled" if not do_umap else "too few points")
    if maps:
        for i, vol in enumerate(maps_at_latents(model, km.on_data_centers, D, a)):
            jio.write_mrc(f("kmeans", f"vol_{i:03d}.mrc"), vol, a, overwrite=True)
        for i, vol in enumerate(maps_at_latents(model, tz, D, a)):
            jio.write_mrc(f("trajectory", f"vol_{i:03d}.mrc"), vol, a, overwrite=True)
    with open(os.path.join(outdir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="PCA/UMAP, k-means maps, trajectories, energy landscape of latents",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="training output folder")
    p.add_argument("-o", "--outdir", default=None, help="default OUT/analyze")
    p.add_argument("-k", "--kmeans", type=int, default=8, help="k-means clusters (default 8)")
    p.add_argument("--n-traj", type=int, default=10, help="maps along the trajectory (default 10)")
    p.add_argument("--knn", type=int, default=10, help="neighbours in the trajectory graph (default 10)")
    p.add_argument("--start", default=None, help="trajectory start: idx:N, pc1:Q (quantile) or z1,z2,...")
    p.add_argument("--end", default=None, help="trajectory end (same forms)")
    p.add_argument("--latents", default=None, help="analyse these latents instead of OUT/latents.npy")
    p.add_argument("--labels", default=None, help=".npy of per-image labels to colour a PCA plot (e.g. true frames)")
    p.add_argument("--no-umap", action="store_true")
    p.add_argument("--no-maps", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    labels = np.load(args.labels) if args.labels else None
    s = analyze_run(args.out, args.outdir, args.kmeans, args.n_traj, args.knn, args.start, args.end,
                    not args.no_umap, not args.no_maps, args.latents, labels, args.force, args.seed)
    outdir = args.outdir or os.path.join(args.out, "analyze")
    print(f"wrote {len(s['files'])} files to {outdir}; PC1+PC2 explain "
          f"{100 * sum(s['pca_explained_variance_ratio'][:2]):.0f}% of the latent variance; UMAP: {s['umap']}")
    return 0
