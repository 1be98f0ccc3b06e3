"""MRC maps and MRCS image stacks (MRC2014, via the ``mrcfile`` package).

Arrays are ``V[z, y, x]`` for maps and ``I[n, y, x]`` for stacks (MRC order). Voxel and
pixel sizes are in Angstrom (the header's cell length divided by the grid size). Data of
any MRC mode is returned as float32; mode 2 (float32) and mode 12 (float16) are the
usual ones for particle stacks.

Stacks are read through a read-only memory map (:func:`open_stack`), so only the images
asked for are touched; nothing here ever loads a whole stack unless asked to.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import mrcfile
import numpy as np

from jaxhet._errors import JaxhetInputError

__all__ = ["read_mrc", "write_mrc", "open_stack", "write_stack", "create_stack",
           "read_mrc_header", "MRCStack", "StackWriter"]


def _check_exists(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise JaxhetInputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise JaxhetInputError(f"{path}: is a directory, expected an MRC file")
    return path


def _check_overwrite(path, overwrite: bool) -> str:
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise JaxhetInputError(f"{path}: file exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        raise JaxhetInputError(f"{path}: folder {parent} does not exist")
    return path


def _open_error(path: str, err: Exception) -> JaxhetInputError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return JaxhetInputError(f"{path}: truncated or corrupt MRC file ({msg})")


def _voxel_size(mrc) -> float:
    return float(mrc.voxel_size.x)


def _check_finite(path: str, images: np.ndarray, indices: np.ndarray | None) -> None:
    """Raise naming the first image holding NaN/inf pixels."""
    flat = images.reshape(images.shape[0], -1) if images.ndim >= 2 else images.reshape(1, -1)
    if np.isfinite(flat.sum(axis=1)).all():  # fast path: one reduction
        return
    bad = np.nonzero(~np.isfinite(flat).all(axis=1))[0]
    if bad.size == 0:  # the sum overflowed float32 but every pixel is finite
        return
    which = int(indices[bad[0]]) if indices is not None else int(bad[0])
    raise JaxhetInputError(f"{path}: image {which} has NaN or infinite pixels")


def _update_stats(mrc) -> None:
    with warnings.catch_warnings():  # NaN data warns; reading such data raises instead
        warnings.simplefilter("ignore", RuntimeWarning)
        mrc.update_header_stats()


def read_mrc(path) -> tuple[np.ndarray, float]:
    """Read a whole MRC/MRCS file into memory.

    Args:
        path: file name.

    Returns:
        ``(array, voxel_size_in_angstroms)``: float32 ``[z, y, x]`` for a map,
        ``[n, y, x]`` for a stack, ``[y, x]`` for a single image.

    Raises:
        JaxhetInputError: missing, truncated or corrupt file, or NaN/inf values.
    """
    path = _check_exists(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=False) as mrc:
                data = np.asarray(mrc.data, dtype=np.float32)
                voxel = _voxel_size(mrc)
    except (ValueError, OSError, EOFError) as e:
        raise _open_error(path, e) from None
    if data is None or data.size == 0:
        raise JaxhetInputError(f"{path}: MRC file holds no data")
    if not np.isfinite(data).all():
        if data.ndim == 3:
            _check_finite(path, data, None)
        raise JaxhetInputError(f"{path}: data has NaN or infinite values")
    return data, voxel


def read_mrc_header(path) -> dict:
    """Shape, mode and voxel size of an MRC file without reading its data.

    Returns:
        dict with ``shape`` (tuple, MRC order), ``mode`` (int), ``voxel_size`` (A),
        ``is_stack`` (bool).
    """
    path = _check_exists(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
                h = mrc.header
                shape = (int(h.nz), int(h.ny), int(h.nx))
                return {"shape": shape, "mode": int(h.mode), "voxel_size": _voxel_size(mrc),
                        "is_stack": bool(int(h.ispg) == 0 and int(h.nz) > 1)}
    except (ValueError, OSError, EOFError) as e:
        raise _open_error(path, e) from None


def write_mrc(path, array, voxel_size_A: float, overwrite: bool = False) -> None:
    """Write a map (or an image) as a float32 MRC file.

    Args:
        path: output file name.
        array: ``[z, y, x]`` map or ``[y, x]`` image.
        voxel_size_A: voxel size in Angstrom, stored as cell length / grid size.
        overwrite: replace an existing file; otherwise an existing file is an error.
    """
    path = _check_overwrite(path, overwrite)
    data = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    if data.ndim not in (2, 3):
        raise JaxhetInputError(f"{path}: expected a 2D or 3D array, got shape {data.shape}")
    with mrcfile.new(path, overwrite=True) as mrc:
        with warnings.catch_warnings():  # NaN data warns; reading such data raises
            warnings.simplefilter("ignore", RuntimeWarning)
            mrc.set_data(data)
        mrc.voxel_size = float(voxel_size_A)
        _update_stats(mrc)


def write_stack(path, images, pixel_size_A: float, overwrite: bool = False,
                dtype=np.float32) -> None:
    """Write images ``[n, y, x]`` as an MRCS image stack.

    Args:
        path: output file name (``.mrcs`` by convention).
        images: array ``[n, y, x]`` (a single ``[y, x]`` image becomes a 1-image stack).
        pixel_size_A: pixel size in Angstrom.
        overwrite: replace an existing file.
        dtype: ``np.float32`` (mode 2) or ``np.float16`` (mode 12).
    """
    path = _check_overwrite(path, overwrite)
    data = np.asarray(images)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise JaxhetInputError(f"{path}: expected images [n, y, x], got shape {data.shape}")
    data = np.ascontiguousarray(data.astype(np.dtype(dtype), copy=False))
    with mrcfile.new(path, overwrite=True) as mrc:
        with warnings.catch_warnings():  # NaN data warns; reading such data raises
            warnings.simplefilter("ignore", RuntimeWarning)
            mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = float(pixel_size_A)
        _update_stats(mrc)


class StackWriter:
    """A new stack file filled image by image (memory-mapped; see :func:`create_stack`).

    Usage::

        with create_stack("out.mrcs", n, box, pixel_size_A=1.5) as w:
            w[0:256] = images
    """

    def __init__(self, path: str, n: int, box: int, pixel_size_A: float, dtype=np.float32):
        mode = {np.dtype(np.float32): 2, np.dtype(np.float16): 12}.get(np.dtype(dtype))
        if mode is None:
            raise JaxhetInputError(f"{path}: stack dtype must be float32 or float16, got {dtype}")
        self.path = path
        self._mrc = mrcfile.new_mmap(path, shape=(int(n), int(box), int(box)), mrc_mode=mode,
                                     overwrite=True)
        self._mrc.set_image_stack()
        self._mrc.voxel_size = float(pixel_size_A)
        self.shape = (int(n), int(box), int(box))

    def __setitem__(self, index, images) -> None:
        self._mrc.data[index] = np.asarray(images)

    def close(self) -> None:
        if self._mrc is not None:
            _update_stats(self._mrc)
            self._mrc.close()
            self._mrc = None

    def __enter__(self) -> "StackWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_stack(path, n: int, box: int, pixel_size_A: float, overwrite: bool = False,
                 dtype=np.float32) -> StackWriter:
    """Create an ``n x box x box`` stack on disk to be written in pieces (memory-mapped).

    Args:
        path: output file name.
        n: number of images.
        box: image size in pixels.
        pixel_size_A: pixel size in Angstrom.
        overwrite: replace an existing file.
        dtype: float32 (mode 2) or float16 (mode 12).

    Returns:
        a :class:`StackWriter`; assign with ``w[i] = image`` or ``w[a:b] = images``.
    """
    path = _check_overwrite(path, overwrite)
    return StackWriter(path, n, box, pixel_size_A, dtype)


class MRCStack:
    """A read-only, memory-mapped MRC/MRCS image stack.

    Attributes:
        path: the file name.
        shape: ``(n, ny, nx)``.
        voxel_size: pixel size in Angstrom from the header.
        dtype: the on-disk numpy dtype.

    Indexing with an int, a slice or an integer array returns float32 images
    (``[ny, nx]`` for an int, ``[k, ny, nx]`` otherwise); indices are 0-based and must
    lie in ``[0, n)``. Batches are read in sorted order and checked for NaN/inf.
    """

    def __init__(self, path, check_finite: bool = True):
        path = _check_exists(path)
        self.path = path
        self.check_finite = check_finite
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._mrc = mrcfile.mmap(path, mode="r", permissive=False)
        except (ValueError, OSError, EOFError) as e:
            raise _open_error(path, e) from None
        data = self._mrc.data
        if data is None:
            self._mrc.close()
            raise JaxhetInputError(f"{path}: MRC file holds no data")
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            self._mrc.close()
            raise JaxhetInputError(f"{path}: expected a stack of 2D images, got shape {data.shape}")
        self._data = data
        self.shape = tuple(int(s) for s in data.shape)
        self.voxel_size = _voxel_size(self._mrc)
        self.dtype = data.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _bad_index(self, i) -> JaxhetInputError:
        return JaxhetInputError(
            f"{self.path}: image index {int(i)} out of range for a stack of {self.shape[0]} images")

    def __getitem__(self, indices) -> np.ndarray:
        if self._data is None:
            raise JaxhetInputError(f"{self.path}: stack is closed")
        n = self.shape[0]
        if isinstance(indices, (int, np.integer)):
            i = int(indices)
            if not 0 <= i < n:
                raise self._bad_index(i)
            img = np.asarray(self._data[i], dtype=np.float32)
            if self.check_finite:
                _check_finite(self.path, img[None], np.array([i]))
            return img
        if isinstance(indices, slice):
            idx = np.arange(n)[indices]
        else:
            idx = np.asarray(indices)
            if idx.dtype == bool:
                raise JaxhetInputError(f"{self.path}: boolean masks are not supported as stack indices")
            idx = idx.astype(np.int64).reshape(-1)
        if idx.size == 0:
            return np.zeros((0,) + self.shape[1:], np.float32)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0:
            raise self._bad_index(lo)
        if hi >= n:
            raise self._bad_index(hi)
        if idx.size > 1 and np.any(idx[1:] < idx[:-1]):
            order = np.argsort(idx, kind="stable")
            out = np.empty((idx.size,) + self.shape[1:], np.float32)
            out[order] = self._read_sorted(idx[order])
        else:
            out = self._read_sorted(idx)
        if self.check_finite:
            _check_finite(self.path, out, idx)
        return out

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        # a contiguous run is one slice of the memory map; otherwise fancy indexing
        if idx[-1] - idx[0] + 1 == idx.size:
            block = self._data[idx[0]:idx[-1] + 1]
        else:
            block = self._data[idx]
        return np.asarray(block, dtype=np.float32)

    def close(self) -> None:
        """Release the memory map and the file."""
        if getattr(self, "_mrc", None) is not None:
            self._data = None
            self._mrc.close()
            self._mrc = None

    def __enter__(self) -> "MRCStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"MRCStack({self.path!r}, shape={self.shape}, voxel_size={self.voxel_size:g})"


def open_stack(path, check_finite: bool = True) -> MRCStack:
    """Open an MRC/MRCS stack read-only through a memory map.

    Args:
        path: file name.
        check_finite: raise if a read image holds NaN/inf pixels.

    Returns:
        :class:`MRCStack` with ``.shape``, ``.voxel_size`` and ``[indices]`` -> float32.
    """
    return MRCStack(path, check_finite=check_finite)


def stack_box_sizes(paths: Sequence[str]) -> dict[str, int]:
    """Image size (nx) of each existing stack file (header only); missing files are left out."""
    out = {}
    for p in paths:
        if os.path.isfile(p):
            try:
                out[p] = read_mrc_header(p)["shape"][2]
            except JaxhetInputError:
                pass
    return out
