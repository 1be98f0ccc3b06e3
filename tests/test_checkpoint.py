"""Checkpoints of iterative methods: exact round trip, atomic write."""

import os

import numpy as np

from jaxhet.inference._checkpoint import load_state_npz, save_state_npz
from jaxhet.inference._classify import (ClassificationConfig, ClassificationState, load_classification_state,
                                        save_classification_state)
from jaxhet.inference._multibody import MultiBodyConfig, MultiBodyState, load_multibody_state, save_multibody_state


def _fill(cls, rng):
    """A state with random arrays for array fields and scalars for scalar fields."""
    scalars = {"max_radius": 7.5, "iteration": 3, "pixel_size": 2.25}
    return cls(**{f: scalars.get(f, rng.normal(size=(3, 2)).astype(np.float32)) for f in cls._fields})


def _assert_same(a, b):
    assert type(a) is type(b)
    for f in a._fields:
        x, y = getattr(a, f), getattr(b, f)
        if np.ndim(x) == 0:
            assert x == y and type(y) in (int, float), (f, x, y)
        else:
            np.testing.assert_array_equal(x, y)
            assert np.asarray(x).dtype == y.dtype


def test_classification_state_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    state = _fill(ClassificationState, rng)
    cfg = ClassificationConfig(n_classes=5, tau2_fudge=2.0, seed=11)
    p = str(tmp_path / "cls.npz")
    save_classification_state(p, state, cfg)
    s2, c2 = load_classification_state(p)
    _assert_same(state, s2)
    assert c2 == cfg and isinstance(s2.iteration, int)
    assert os.listdir(tmp_path) == ["cls.npz"]  # no temporary left behind


def test_multibody_state_round_trip_and_overwrite(tmp_path):
    rng = np.random.default_rng(1)
    cfg = MultiBodyConfig(sweeps=4)
    p = str(tmp_path / "mb.npz")
    first, second = _fill(MultiBodyState, rng), _fill(MultiBodyState, rng)
    save_multibody_state(p, first, cfg)
    save_multibody_state(p, second, cfg)  # the newer checkpoint replaces the older one
    s2, c2 = load_multibody_state(p)
    _assert_same(second, s2)
    assert c2 == cfg


def test_generic_state_scalars_stay_scalars(tmp_path):
    from typing import NamedTuple

    class S(NamedTuple):
        x: np.ndarray
        iteration: int

    class C(NamedTuple):
        name: str = "a"

    p = str(tmp_path / "s.npz")
    save_state_npz(p, S(np.arange(4.0), 2), C("b"))
    s, c = load_state_npz(p, S, C)
    assert s.iteration == 2 and isinstance(s.iteration, int) and c.name == "b"
    np.testing.assert_array_equal(s.x, np.arange(4.0))
