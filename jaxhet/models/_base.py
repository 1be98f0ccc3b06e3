"""The hyper-molecule interface V(tau, k) shared by every volume parameterisation, and
the model registry.

A *hyper-molecule* (survey §7) is a map that depends on a conformation tau. Every model
in :mod:`jaxhet.models` is a Flax NNX module answering

    fourier(tau[latent_dim], k[..., 3] in 1/A) -> complex DFT values [...]

in jaxhet's normalisation (maps hold mass per voxel, so DFT values do not depend on the
pixel size; COMMON.md / :mod:`jaxhet.core.atoms`). It plugs straight into the forward
model::

    image_ft = render_fourier(partial(model.fourier, tau), A, shift, ctf, D, pixel_size)

and optionally ``density(tau, r[..., 3] in A)`` (real-space values, mass per voxel) where
the parameterisation is natural in real space. Attributes ``box_size``, ``pixel_size``
(of the grid the model was built for) and ``latent_dim`` (0 for a homogeneous model), and
the helper :meth:`HyperMolecule.volume` (a real map ``[D, D, D]`` at any tau, on the
model's grid or on any other box / voxel size).

Adding a model (linear/PPCA, GMM, deformation, multibody, ...)::

    from jaxhet.models import HyperMolecule, register_model

    @register_model("gmm", example=lambda rngs: GMMModel(box_size=8, pixel_size=3.0,
                                                          latent_dim=2, rngs=rngs))
    class GMMModel(HyperMolecule):
        def __init__(self, box_size, pixel_size, latent_dim, n_gaussians=16, *, rngs):
            self.box_size, self.pixel_size, self.latent_dim = box_size, pixel_size, latent_dim
            self.n_gaussians = n_gaussians
            ...                                   # nnx.Param leaves
        def config(self):                         # the kwargs that rebuild it
            return dict(box_size=self.box_size, pixel_size=self.pixel_size,
                        latent_dim=self.latent_dim, n_gaussians=self.n_gaussians)
        def fourier(self, tau, k): ...            # complex [...]

``example`` builds a *small* instance; the shared contract test
(``tests/test_models_contract.py``) runs every registered model through shapes, jit,
vmap over tau and k, grad w.r.t. the parameters (nnx), Hermitian symmetry and the
``volume`` / ``fourier`` consistency, so a new model is tested the moment it registers
(import its module in ``jaxhet/models/__init__.py``). :func:`save_model` /
:func:`load_model` store any registered model as ``config.json``-style metadata plus its
state leaves, which is how ``jaxhet eval-vol`` finds a trained model again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Complex, Float

from jaxhet._errors import JaxhetInputError
from jaxhet.core import frequency_grid_3d, ifft3_centered

__all__ = ["HyperMolecule", "ModelSpec", "register_model", "get_model_spec", "list_models",
           "create_model", "model_name", "save_model", "load_model", "model_state_to_arrays",
           "model_state_from_arrays"]


class HyperMolecule(nnx.Module):
    """Base class of every volume model V(tau, k).

    Subclasses set ``box_size`` (int), ``pixel_size`` (A) and ``latent_dim`` (int) in
    ``__init__`` and implement :meth:`fourier` and :meth:`config`; :meth:`density` is
    optional (``has_density = True`` when implemented).
    """

    has_density: bool = False
    box_size: int
    pixel_size: float
    latent_dim: int

    def fourier(self, tau: Float[Array, "latent"], k: Float[Array, "... 3"]) -> Complex[Array, "..."]:
        """DFT values of the map at conformation tau, at 3D frequencies k (1/A).

        Args:
            tau: [latent_dim] conformation (shape [0] for a homogeneous model).
            k: [..., 3] frequencies (kx, ky, kz) in 1/A.

        Returns:
            complex64 [...]; ``F(-k) = conj F(k)`` (the map is real).
        """
        raise NotImplementedError

    def density(self, tau: Float[Array, "latent"], r: Float[Array, "... 3"]) -> Float[Array, "..."]:
        """Real-space map values (mass per voxel) at positions r = (x, y, z) in A."""
        raise NotImplementedError(f"{type(self).__name__} has no real-space density")

    def config(self) -> dict:
        """JSON-serialisable keyword arguments that rebuild this model (without ``rngs``)."""
        raise NotImplementedError

    def volume(self, tau: Float[Array, "latent"], box_size: int | None = None,
               pixel_size: float | None = None) -> Float[Array, "d d d"]:
        """Real map ``[D, D, D]`` (z, y, x) at tau: inverse DFT of :meth:`fourier` on the grid.

        Args:
            tau: [latent_dim].
            box_size, pixel_size: output grid (default: the model's). Because DFT values
                do not depend on the pixel size, a model evaluated on a finer or larger
                grid gives the Fourier-padded (or cropped) map.

        The spectrum is evaluated one z-plane at a time (``lax.map``) to bound memory.
        """
        D = self.box_size if box_size is None else int(box_size)
        a = self.pixel_size if pixel_size is None else float(pixel_size)
        k = jnp.asarray(frequency_grid_3d(D, a))  # [D, D, D, 3] in 1/A
        tau = jnp.asarray(tau, jnp.float32)
        spectrum = jax.lax.map(lambda kz: self.fourier(tau, kz), k)
        return ifft3_centered(spectrum).real.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, class and a factory of a small example instance."""

    name: str
    cls: type
    example: Callable[[nnx.Rngs], HyperMolecule] | None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, example: Callable[[nnx.Rngs], HyperMolecule] | None = None):
    """Class decorator adding a :class:`HyperMolecule` subclass to the registry.

    Args:
        name: registry key (also written into saved models).
        example: ``rngs -> instance`` building a small model for the contract test.
    """

    def deco(cls):
        if not issubclass(cls, HyperMolecule):
            raise TypeError(f"register_model: {cls.__name__} is not a HyperMolecule")
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"register_model: name {name!r} already used by {_REGISTRY[name].cls.__name__}")
        _REGISTRY[name] = ModelSpec(name, cls, example)
        cls.registry_name = name
        return cls

    return deco


def list_models() -> list[str]:
    """Names of all registered models."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise JaxhetInputError(f"unknown model {name!r} (registered: {', '.join(list_models())})") from None


def create_model(name: str, rngs: nnx.Rngs | None = None, **config) -> HyperMolecule:
    """Instantiate a registered model from its name and :meth:`HyperMolecule.config`."""
    spec = get_model_spec(name)
    return spec.cls(**config, rngs=rngs if rngs is not None else nnx.Rngs(0))


def model_name(model: HyperMolecule) -> str:
    name = getattr(type(model), "registry_name", None)
    if name is None:
        raise ValueError(f"{type(model).__name__} is not a registered model")
    return name


def model_state_to_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
    """All state leaves of a module as ``{"path/to/leaf": array}`` (for npz files)."""
    flat = nnx.to_flat_state(nnx.state(module))
    return {"/".join(str(p) for p in path): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for path, v in flat}


def model_state_from_arrays(module: nnx.Module, arrays: dict[str, np.ndarray], source: str = "") -> None:
    """Load leaves written by :func:`model_state_to_arrays` into ``module`` (in place)."""
    state = nnx.state(module)
    flat = nnx.to_flat_state(state)
    new = []
    for path, v in flat:
        key = "/".join(str(p) for p in path)
        if key not in arrays:
            raise JaxhetInputError(f"{source}: missing model parameter {key}")
        arr = np.asarray(arrays[key])
        old = v.get_value()
        if arr.shape != tuple(old.shape):
            raise JaxhetInputError(f"{source}: parameter {key} has shape {arr.shape}, expected {tuple(old.shape)}")
        new.append((path, v.replace(jnp.asarray(arr, old.dtype))))
    nnx.update(module, nnx.from_flat_state(new))


def save_model(path: str, model: HyperMolecule, overwrite: bool = False) -> None:
    """Write a registered model to ``path`` (an ``.npz`` holding its config and state)."""
    if os.path.exists(path) and not overwrite:
        raise JaxhetInputError(f"{path}: exists (pass overwrite=True)")
    meta = json.dumps({"model": model_name(model), "config": model.config()})
    arrays = model_state_to_arrays(model)
    tmp = path + ".tmp.npz"
    np.savez(tmp, __meta__=np.frombuffer(meta.encode(), np.uint8), **{"p:" + k: v for k, v in arrays.items()})
    os.replace(tmp, path)


def load_model(path: str) -> HyperMolecule:
    """Read a model written by :func:`save_model`."""
    if not os.path.exists(path):
        raise JaxhetInputError(f"{path}: no such model file")
    with np.load(path) as f:
        if "__meta__" not in f:
            raise JaxhetInputError(f"{path}: not a jaxhet model file")
        meta = json.loads(bytes(f["__meta__"]).decode())
        arrays = {k[2:]: f[k] for k in f.files if k.startswith("p:")}
    model = create_model(meta["model"], **meta["config"])
    model_state_from_arrays(model, arrays, path)
    return model
