"""Streaming particle images in batches, from memory-mapped stacks.

:class:`ParticleDataset` never loads a whole stack: each batch reads only its images,
grouped per stack file and in sorted order, through read-only memory maps (at most
``max_open_files`` stacks are kept open, least recently used closed first). A background
thread prepares the next batch(es) while the caller works on the current one, through a
bounded queue, so memory does not grow with the number of particles.

Downsampling (``downsample_to=D'``) crops the centred 2D Fourier transform of each D x D
image to D' x D' (frequencies -D'/2 .. D'/2 - 1 cycles per box) and transforms back. The
pixel size becomes ``pixel_size * D / D'`` and origins (in pixels) scale by ``D' / D``.
Intensity convention (jaxhet's, as ``jaxhet.core.downsample_2d`` and cryoDRGN's
``downsample``): images hold mass per pixel, so cropping keeps the DFT values and the
sum of the pixels; the coarse image equals the band-limited image sampled at the new
pixel centres times (D/D')^2 (the centre pixel D//2 maps to D'//2). White noise of
standard deviation s per pixel becomes white noise of s * D/D'. A map reconstructed
from downsampled images is then the map of the full-size data Fourier-cropped
(``jaxhet.core.downsample_3d``), whatever the box.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
import scipy.fft

from jaxhet._errors import JaxhetInputError
from jaxhet.core._ctf import CTFParams
from jaxhet.io._mrc import MRCStack
from jaxhet.io._table import ParticleTable

__all__ = ["ParticleBatch", "ParticleDataset", "fourier_downsample"]


class ParticleBatch(NamedTuple):
    """One batch of particles.

    Attributes:
        images: float32 [B, D, D] (D = the dataset's ``image_size``).
        rotations: float32 [B, 3, 3] RELION matrices A (NaN if the table has no poses).
        origin_in_pixels: float32 [B, 2] RELION origins in the (downsampled) pixels.
        ctf: CTFParams of float32 [B] arrays.
        indices: int64 [B] rows of the table.
        pixel_size_in_angstroms: the (downsampled) pixel size.
    """

    images: np.ndarray
    rotations: np.ndarray
    origin_in_pixels: np.ndarray
    ctf: CTFParams
    indices: np.ndarray
    pixel_size_in_angstroms: float


def fourier_downsample(images, new_box: int) -> np.ndarray:
    """Fourier-crop images [..., D, D] to [..., D', D'] keeping their DFT values (mass; module doc).

    Args:
        images: real images, last two axes square (D may be odd).
        new_box: D', even, 2 <= D' <= D.

    Returns:
        float32 [..., D', D'].
    """
    x = np.asarray(images, dtype=np.float32)
    D = x.shape[-1]
    if x.shape[-2] != D:
        raise JaxhetInputError(f"fourier_downsample: images must be square, got {x.shape[-2:]}")
    new_box = int(new_box)
    if new_box == D:
        return x.copy()
    if new_box % 2 or new_box < 2 or new_box > D:
        raise JaxhetInputError(f"fourier_downsample: new box {new_box} must be even and between 2 and {D}")
    h = new_box // 2
    # transform about the centre pixel (D//2 -> index 0), so that it maps to new_box//2
    # for odd D as well as even D
    F = scipy.fft.rfft2(np.fft.ifftshift(x, axes=(-2, -1)), axes=(-2, -1))
    rows = np.r_[0:h, D - h:D]  # frequencies 0..h-1 and -h..-1 along y
    Fc = F[..., rows, :h + 1]
    out = scipy.fft.irfft2(Fc, s=(new_box, new_box), axes=(-2, -1))
    out = np.fft.fftshift(out, axes=(-2, -1))
    return out.astype(np.float32)  # numpy's unnormalised FFTs: DFT values unchanged


class ParticleDataset:
    """Particle images of a ParticleTable, read lazily in batches.

    Args:
        table: the particles (one box size and pixel size for all; see
            ``ParticleTable.box`` / ``.pixel_size``).
        downsample_to: even box D' to Fourier-crop to (None: keep D).
        max_open_files: how many stack files to keep memory-mapped at once.
        check_finite: raise JaxhetInputError on NaN/inf pixels (naming file and index).
        prefetch: how many batches the background thread prepares ahead (0: none).

    Attributes:
        box: the images' size on disk. image_size: the size returned (D' or D).
        pixel_size_in_angstroms: the returned images' pixel size.
    """

    def __init__(self, table: ParticleTable, downsample_to: int | None = None,
                 max_open_files: int = 64, check_finite: bool = True, prefetch: int = 2):
        self.table = table
        self.box = table.box
        self.original_pixel_size = table.pixel_size
        name = table.filename or "particles"
        if downsample_to is None or int(downsample_to) == self.box:
            self.image_size = self.box
        else:
            d = int(downsample_to)
            if d % 2 or d < 2 or d > self.box:
                raise JaxhetInputError(
                    f"{name}: downsample_to={d} must be an even box between 2 and the image size {self.box}")
            self.image_size = d
        self.scale = self.image_size / self.box
        self.pixel_size_in_angstroms = self.original_pixel_size * self.box / self.image_size
        self.max_open_files = max(1, int(max_open_files))
        self.check_finite = check_finite
        self.prefetch = max(0, int(prefetch))
        self._codes, self._files = pd.factorize(pd.Series(table.stack_paths), sort=False)
        self._files = [str(f) for f in self._files]
        self._open: OrderedDict[int, MRCStack] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.table)

    # ---------------------------------------------------------------- reading
    def _stack(self, code: int) -> MRCStack:
        st = self._open.get(code)
        if st is not None:
            self._open.move_to_end(code)
            return st
        st = MRCStack(self._files[code], check_finite=self.check_finite)
        if st.shape[1:] != (self.box, self.box):
            st.close()
            raise JaxhetInputError(
                f"{self._files[code]}: images are {st.shape[1]}x{st.shape[2]} but "
                f"{self.table.filename or 'the metadata'} says box {self.box}")
        self._open[code] = st
        while len(self._open) > self.max_open_files:
            _, old = self._open.popitem(last=False)
            old.close()
        return st

    def read_images(self, rows) -> np.ndarray:
        """Images of table rows ``rows`` as float32 [B, D', D'] (downsampled if asked)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self.table)):
            bad = int(rows[(rows < 0) | (rows >= len(self.table))][0])
            raise JaxhetInputError(
                f"{self.table.filename or 'particles'}: particle {bad} out of range for {len(self.table)} particles")
        out = np.empty((rows.size, self.box, self.box), np.float32)
        codes = self._codes[rows]
        order = np.argsort(codes, kind="stable")
        sc = codes[order]
        starts = np.r_[0, np.nonzero(np.diff(sc))[0] + 1, sc.size]
        with self._lock:
            for a, b in zip(starts[:-1], starts[1:]):
                if a == b:
                    continue
                pos = order[a:b]
                stack = self._stack(int(sc[a]))
                out[pos] = stack[self.table.stack_indices[rows[pos]]]
        if self.image_size != self.box:
            out = fourier_downsample(out, self.image_size)
        return out

    def get_batch(self, rows) -> ParticleBatch:
        """The ParticleBatch of table rows ``rows`` (read now, in this thread)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        images = self.read_images(rows)
        t = self.table
        return ParticleBatch(
            images=images,
            rotations=t.rotation_matrices(rows),
            origin_in_pixels=(t.origin_in_pixels[rows] * self.scale).astype(np.float32),
            ctf=t.ctf_params(rows),
            indices=rows,
            pixel_size_in_angstroms=float(self.pixel_size_in_angstroms))

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, indices=None,
                drop_last: bool = False) -> Iterator[ParticleBatch]:
        """Iterate over the particles in batches, prefetching in a background thread.

        Args:
            batch_size: images per batch.
            shuffle: visit the particles in a random order (``seed``).
            seed: seed of the shuffle.
            indices: the table rows to visit (default all).
            drop_last: skip a last, smaller batch.

        Yields:
            ParticleBatch.
        """
        batch_size = int(batch_size)
        if batch_size < 1:
            raise JaxhetInputError(f"batch_size must be >= 1, got {batch_size}")
        rows = np.arange(len(self.table)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self.table)):
            raise JaxhetInputError(
                f"{self.table.filename or 'particles'}: indices out of range for {len(self.table)} particles")
        if shuffle:
            rows = np.random.default_rng(seed).permutation(rows)
        n_full = rows.size // batch_size
        bounds = [(i * batch_size, (i + 1) * batch_size) for i in range(n_full)]
        if rows.size % batch_size and not drop_last:
            bounds.append((n_full * batch_size, rows.size))
        if self.prefetch == 0:
            for a, b in bounds:
                yield self.get_batch(rows[a:b])
            return
        yield from self._prefetched(rows, bounds)

    def _prefetched(self, rows, bounds) -> Iterator[ParticleBatch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def worker():
            try:
                for a, b in bounds:
                    if stop.is_set():
                        return
                    if not put(("batch", self.get_batch(rows[a:b]))):
                        return
                put(("done", None))
            except BaseException as e:  # handed to the consumer
                put(("error", e))

        thread = threading.Thread(target=worker, name="jaxhet-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "batch":
                    yield item
                elif kind == "done":
                    return
                else:
                    raise item
        finally:
            stop.set()
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            thread.join(timeout=10)

    def close(self) -> None:
        """Close every open stack file."""
        with self._lock:
            while self._open:
                _, st = self._open.popitem()
                st.close()

    def __enter__(self) -> "ParticleDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
