"""Cost of one local-search refinement step at D=64 and D=128 (issue 3: "practical at D=128").

Simulated AdK images (1000 at D=64, 2 A/px; 512 at D=128, 1 A/px; SNR 0.1). For each box and
comparison limit r_max (cycles per box), one E-step (local window of M rotations x 13
translations, frequency-limited comparisons) plus the M-step insertion is run over all
images in batches of 128 after a warm-up batch (compilation excluded); reported: CPU
seconds per image (process time, all threads: robust to a shared machine) and wall
seconds per image. A whole refinement iteration costs N x that.

    python experiments/exp_refine_speed.py
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results", "refine_speed.json")


def main():
    import jax.numpy as jnp
    from jaxhet.core import CTFParams, euler_to_matrix
    from jaxhet.inference import (SearchStage, init_reconstruction, local_pose_search, local_rotation_vectors,
                                  prepare_reference)
    from jaxhet.inference._reconstruct import _backproject_images_jit, _static_fs
    from jaxhet.sim import SimulationParams, ground_truth_map, load_structure, simulate_images

    st = load_structure("adk-closed")
    rows = []
    for D, pix, n in ((64, 2.0, 1000), (128, 1.0, 512)):
        p = SimulationParams(n_images=n, box_size=D, pixel_size=pix, snr=0.1, seed=0)
        imgs, meta, sigma = simulate_images(st, p)
        gt = ground_truth_map(st, 0, D, pix)
        R = np.asarray(euler_to_matrix(jnp.asarray(meta.euler_in_degrees)))
        spec = prepare_reference(gt, pix)
        noise = np.full(D // 2 + 1, sigma ** 2)
        B = 128
        for rmax in (D // 4, D // 2 - 1):
            for rng_deg, step in ((6.0, 2.0), (10.0, 2.5)):
                stage = SearchStage("local", step, rng_deg, 1.0, 0.5)
                M = len(local_rotation_vectors(rng_deg, step)[0])
                state = init_reconstruction(D)

                def run(s, e, state):
                    c = CTFParams(*[np.asarray(x)[s:e] for x in meta.ctf])
                    out = local_pose_search(spec, imgs[s:e], c, R[s:e], np.zeros((e - s, 2)), noise, pix, stage,
                                            rmax)
                    state = _backproject_images_jit(state, jnp.asarray(imgs[s:e]), out.rotations, out.shifts, c,
                                                    jnp.zeros(e - s, jnp.int32), jnp.ones(e - s), jnp.float32(pix),
                                                    _static_fs(D), "relion", True)
                    state.weight.block_until_ready()
                    return state

                state = run(0, B, state)  # warm-up / compile
                c0, w0 = time.process_time(), time.time()
                m = 0
                for s in range(B, n - B + 1, B):
                    state = run(s, s + B, state)
                    m += B
                cpu, wall = (time.process_time() - c0) / m, (time.time() - w0) / m
                row = dict(box=D, r_max=rmax, rotations=M, shifts=13, images=m, cpu_s_per_image=cpu,
                           wall_s_per_image=wall, cpu_minutes_per_10k_images=cpu * 1e4 / 60)
                rows.append(row)
                print(f"D={D:4d} r_max={rmax:3d} M={M:4d} x 13 shifts: {cpu * 1e3:7.1f} ms CPU/image "
                      f"({wall * 1e3:7.1f} ms wall) -> {row['cpu_minutes_per_10k_images']:.1f} CPU-min per 10k images",
                      flush=True)
    with open(RESULTS, "w") as f:
        json.dump(dict(load_average=os.getloadavg(), rows=rows), f, indent=1)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
