"""Shared fixtures and helpers for the jaxhet test suite.

Tolerances are scaled by the float32 machine epsilon (``EPS32`` ~ 1.19e-7) rather than
hard-coded, so that a test's threshold says how many roundings it allows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EPS32 = float(np.finfo(np.float32).eps)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (Frobenius / 2-norm over all entries)."""
    a = np.asarray(a)
    b = np.asarray(b)
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def random_ball_positions(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    """n points uniform in a ball of the given radius, float32 [n, 3]."""
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    r = radius * rng.uniform(0.0, 1.0, (n, 1)) ** (1.0 / 3.0)
    return (d * r).astype(np.float32)


def random_rotation_np(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform random rotations from numpy alone (QR of Gaussian matrices), [n, 3, 3] float32."""
    out = []
    for _ in range(n):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))[None, :]
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        out.append(q)
    return np.asarray(out, np.float32)


def random_ctf_batch(rng: np.random.Generator, n: int):
    """A batch of realistic, astigmatic CTF parameters (jaxhet.core.CTFParams)."""
    from jaxhet.core import CTFParams

    du = rng.uniform(8000.0, 25000.0, n)
    return CTFParams.create(du, du - rng.uniform(0.0, 1500.0, n), rng.uniform(-180.0, 180.0, n),
                            300.0, 2.7, 0.1, 0.0, rng.uniform(0.0, 80.0, n))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def atoms(rng):
    """A small random 'molecule' of Gaussian atoms for D=64, 2 A/px (within 0.15 D of centre).

    Returns (positions [n,3] A, masses [n], sigmas [n] A, box_size, pixel_size).
    """
    D, a = 64, 2.0
    n = 60
    pos = random_ball_positions(rng, n, 0.15 * D * a)
    m = rng.uniform(1.0, 10.0, n).astype(np.float32)
    sig = (rng.uniform(1.0, 1.5, n) * a).astype(np.float32)
    return jnp.asarray(pos), jnp.asarray(m), jnp.asarray(sig), D, a


# --------------------------------------------------------------------------------------
# Opt-in CPU-time report (robust to a loaded machine, unlike --durations' wall time):
#   JAXHET_CPU_REPORT=cpu_times.json pytest -q
# records user+system CPU seconds of each test (this process and its finished
# subprocesses) and prints the 25 most expensive at the end.
# --------------------------------------------------------------------------------------
import os as _os

_CPU_TIMES: dict[str, float] = {}


def _cpu_now() -> float:
    t = _os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _os.environ.get("JAXHET_CPU_REPORT"):
        yield
        return
    t0 = _cpu_now()
    yield
    _CPU_TIMES[item.nodeid] = _cpu_now() - t0


def pytest_terminal_summary(terminalreporter):
    path = _os.environ.get("JAXHET_CPU_REPORT")
    if not path or not _CPU_TIMES:
        return
    import json

    with open(path, "w") as f:
        json.dump(_CPU_TIMES, f, indent=1)
    total = sum(_CPU_TIMES.values())
    terminalreporter.write_line(f"CPU seconds: {total:.0f} in {len(_CPU_TIMES)} tests (written to {path}); top 25:")
    for k, v in sorted(_CPU_TIMES.items(), key=lambda kv: -kv[1])[:25]:
        terminalreporter.write_line(f"  {v:7.1f}  {k}")
