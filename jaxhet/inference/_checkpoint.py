"""Atomic ``.npz`` checkpoints of an iterative method's NamedTuple state and config.

Iterative methods here (classification, multi-body) keep their whole state in a
NamedTuple of numpy arrays and scalars and their settings in a NamedTuple config; this
writes both to one ``.npz`` (the config as JSON) through a temporary file and
``os.replace``, so a killed job never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, TypeVar

import numpy as np

S = TypeVar("S", bound=NamedTuple)
C = TypeVar("C", bound=NamedTuple)


def save_state_npz(path: str, state: NamedTuple, config: NamedTuple) -> None:
    """Write ``state`` (fields as arrays) and ``config`` (as JSON) to ``path`` atomically."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, __config__=np.frombuffer(json.dumps(config._asdict()).encode(), np.uint8),
             **{k: np.asarray(v) for k, v in state._asdict().items()})
    os.replace(tmp, path)


def load_state_npz(path: str, state_cls: type[S], config_cls: type[C]) -> tuple[S, C]:
    """Read a checkpoint written by :func:`save_state_npz`.

    0-d arrays come back as Python scalars and ``iteration`` (when present) as an int.
    """
    with np.load(path) as f:
        cfg = config_cls(**json.loads(bytes(f["__config__"]).decode()))
        fields = {k: (f[k].item() if f[k].ndim == 0 else f[k]) for k in state_cls._fields}
    if "iteration" in fields:
        fields["iteration"] = int(fields["iteration"])
    return state_cls(**fields), cfg
