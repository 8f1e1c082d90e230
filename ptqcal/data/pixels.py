"""A split's images as the model's pixels, streamed: decoded chunk by chunk (each chunk cached on its
own), prefetched in a background thread while the model runs, and never held whole.

An evaluation set of 50,000 ImageNet images is 7.5 GB of 224-pixel uint8 pixels; a run keeps at
most a few chunks and batches of them in memory, whatever the size of the set. Arrays (digits,
CIFAR, ``.npz``) are streamed by slicing, without copies.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Empty, Full, Queue
from typing import Callable, Iterator, TypeVar

import numpy as np

from ..cache import Cache, array_digest, make_key
from .corrupt import Corruption, check_corruptible, corrupt_pixels, corruption_versions
from .decode import decode_images
from .splits import Split
from ..errors import UserError
from ..models import PreprocessCfg

CHUNK_BYTES = 32 << 20  # decoded pixels per cached chunk (about 210 images at 224x224x3)
PREFETCH = 2  # batches prepared ahead of the model

T = TypeVar("T")


@dataclass(frozen=True)
class _Chunk:
    images: np.ndarray
    labels: np.ndarray
    failed: tuple[Path, ...]


@dataclass
class Pixels:
    """The images of ``split`` at the model's size (decoded from files, or the arrays as they are).

    ``len()`` is the number of images listed; :attr:`labels` and :attr:`failed` are known once
    every chunk was decoded (they decode what is missing).

    With a :attr:`corruption`, every chunk's decoded uint8 pixels are corrupted before anything
    reads them (:func:`~.corrupt.corrupt_pixels`, each image seeded by ``corruption_seed``, its
    position in the split and the corruption) and cached as a chunk of their own, keyed by the clean
    chunk's key, the corruption and the versions of the packages that compute it.
    """

    split: Split
    preprocess: PreprocessCfg  # only its geometry (size, resize, interpolation) decides the pixels
    cache: Cache | None = None
    strict: bool = False
    corruption: Corruption | None = None
    corruption_seed: int = 0
    corruption_stream: int = 0  # images of another split at the same positions draw other noise
    _decoded: dict[int, tuple[np.ndarray, tuple[Path, ...]]] = field(default_factory=dict, repr=False)
    # the clean images' key, computed once and shared with the corrupted copies: a run makes its own
    # Pixels, and its images do not change during it (hashing ImageNet's 7.5 GB of arrays takes
    # seconds, and every logits key starts from it); a later run computes it again
    _clean: dict[str, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def chunk_size(self) -> int:
        channels, height, width = self.preprocess.input_size
        return max(1, CHUNK_BYTES // (channels * height * width))

    @property
    def num_chunks(self) -> int:
        return -(-len(self.split) // self.chunk_size)

    @property
    def key(self) -> str:
        """What decides the pixels: the arrays' content, or the files (path, size, mtime) and the
        geometry they are decoded to."""
        if "key" not in self._clean:
            self._clean["key"] = array_digest(self.split.images) if not self.split.is_files else \
                make_key("files", _file_stats(self.split.images), array_digest(self.split.labels), self._geometry())
        clean = self._clean["key"]
        return clean if self.corruption is None else make_key(clean, *self._corruption_key())

    def _corruption_key(self) -> tuple:
        return "corrupted", self.corruption.key, self.corruption_seed, self.corruption_stream, corruption_versions()

    def corrupted(self, corruption: Corruption | None, seed: int, stream: int = 0) -> "Pixels":
        """The same images with ``corruption`` applied (seeded by ``seed``, and by ``stream`` apart
        from another split's images: see :func:`~.corrupt.image_seed`); ``None``: clean."""
        if corruption is not None:
            check_corruptible(self.preprocess.input_size, self.split.images.dtype if not self.split.is_files else None)
        return Pixels(self.split, self.preprocess, self.cache, self.strict, corruption, seed, stream,
                      _clean=self._clean)

    def _geometry(self) -> dict:
        p = self.preprocess
        return {"input_size": p.input_size, "resize": p.resize, "interpolation": p.interpolation}

    def _bounds(self, index: int) -> tuple[int, int]:
        return index * self.chunk_size, min(len(self.split), (index + 1) * self.chunk_size)

    def _clean_key(self, index: int) -> str:
        """What decides chunk ``index``'s clean pixels: its arrays and position, or its files."""
        start, stop = self._bounds(index)
        if not self.split.is_files:
            return make_key(array_digest(self.split.images[start:stop]), start)
        part = self.split.take(np.arange(start, stop))
        return make_key("files", _file_stats(part.images), array_digest(part.labels), self._geometry())

    def _corrupted_key(self, index: int) -> str:
        """What decides chunk ``index``'s corrupted pixels: its clean pixels, where it starts (each
        image's noise is seeded by its position) and the corruption."""
        return make_key(self._clean_key(index), self._bounds(index)[0], *self._corruption_key())

    def is_cached(self, index: int) -> bool:
        """Whether chunk ``index``'s corrupted pixels are in the cache already (only their key is computed)."""
        return self.cache is not None and self.corruption is not None and \
            self.cache.has("corrupt-pixels", self._corrupted_key(index), "npz")

    def chunk(self, index: int, pixels: bool = True) -> _Chunk:
        """Chunk ``index``: a slice of the arrays, or its files decoded (from the cache when there).
        ``pixels=False`` reads only its labels and failures (a cached chunk's pixels stay on disk)."""
        start, stop = self._bounds(index)
        if not self.split.is_files:  # a view, not a copy (hashed only to key a corrupted copy)
            chunk = _Chunk(self.split.images[start:stop], self.split.labels[start:stop], ())
            positions = np.arange(start, stop)
        else:
            part = self.split.take(np.arange(start, stop))
            if self.cache is None:
                chunk = self._decode(part)
            else:
                path = self.cache.file("pixels", self._clean_key(index), "npz",
                                       lambda tmp: _save_chunk(self._decode(part), tmp))
                chunk = _load_chunk(path, pixels)
            if chunk.failed and self.strict:  # cached by a lenient run
                raise UserError(f"cannot decode {chunk.failed[0]}")
            self._decoded[index] = (chunk.labels, chunk.failed)
            # each image is seeded by its position in the split: those after a failed one keep theirs
            failed = set(chunk.failed)
            positions = np.arange(start, stop)[np.array([p not in failed for p in part.images], bool)]
        if self.corruption is None or not pixels:
            return chunk
        return self._corrupt(chunk, positions, index)

    def _corrupt(self, chunk: _Chunk, positions: np.ndarray, index: int) -> _Chunk:
        """Chunk ``index`` (``chunk``, its images at ``positions``) corrupted, cached when there is a
        cache (corrupting takes longer than decoding)."""
        def compute() -> _Chunk:
            return replace(chunk, images=corrupt_pixels(chunk.images, self.corruption, self.corruption_seed,
                                                        positions, self.corruption_stream))
        if self.cache is None:
            return compute()
        return _load_chunk(self.cache.file("corrupt-pixels", self._corrupted_key(index), "npz",
                                           lambda tmp: _save_chunk(compute(), tmp)))

    def _decode(self, part: Split) -> _Chunk:
        p = self.preprocess
        decoded, failed = decode_images(part, p.input_size, p.resize, p.interpolation, self.strict, allow_empty=True)
        return _Chunk(decoded.images, decoded.labels, tuple(failed))

    def _index(self) -> None:
        for index in range(self.num_chunks):
            if index not in self._decoded:
                self.chunk(index, pixels=False)

    @property
    def labels(self) -> np.ndarray:
        """The labels of the images that decoded, in order."""
        if not self.split.is_files:
            return self.split.labels
        self._index()
        labels = np.concatenate([self._decoded[i][0] for i in range(self.num_chunks)])
        if not len(labels):
            raise UserError("none of the images could be decoded")
        return labels

    @property
    def failed(self) -> tuple[Path, ...]:
        """The files that did not decode (skipped)."""
        if not self.split.is_files:
            return ()
        self._index()
        return tuple(p for i in range(self.num_chunks) for p in self._decoded[i][1])

    def chunks(self, start: int = 0) -> Iterator[np.ndarray]:
        """The decoded pixels, chunk by chunk, from decoded image ``start`` on (chunks before it are
        skipped by their labels alone)."""
        for index in range(self.num_chunks):
            if start:
                count = len(self._decoded[index][0]) if index in self._decoded else len(self.chunk(index, False).labels)
                if start >= count:
                    start -= count
                    continue
            images = self.chunk(index).images[start:]
            start = 0
            if len(images):
                yield images

    def batches(self, batch_size: int, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                limit: int | None = None, start: int = 0) -> Iterator[np.ndarray]:
        """Batches of ``batch_size`` images (whatever the chunking: the same batches for the same
        images), from decoded image ``start`` on, ``limit`` images only if given, through
        ``transform``, prepared in a background thread ``PREFETCH`` batches ahead of the consumer."""
        def produce() -> Iterator[np.ndarray]:
            for batch in rebatch(self.chunks(start), batch_size, limit):
                yield transform(batch) if transform is not None else batch
        return prefetched(produce(), PREFETCH)

    def head(self, count: int) -> np.ndarray:
        """The first ``count`` decoded images, as one array."""
        parts = list(rebatch(self.chunks(), count, count))
        if not parts:
            raise UserError("none of the images could be decoded")
        return parts[0]

    def materialise(self) -> Split:
        """Every decoded image in one array (for small splits only: tools that need them whole)."""
        if not self.split.is_files:
            return self.split
        return Split(np.concatenate(list(self.chunks())), self.labels)


def rebatch(chunks: Iterator[np.ndarray], batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """Batches of ``batch_size`` rows from ``chunks`` of any sizes (the last one shorter), stopping
    after ``limit`` rows if given."""
    pending: list[np.ndarray] = []
    held = sent = 0
    for chunk in chunks:
        if limit is not None:
            chunk = chunk[:limit - sent - held]
        pending.append(chunk)
        held += len(chunk)
        while held >= batch_size:
            joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
            yield joined[:batch_size]
            pending, held, sent = [joined[batch_size:]], held - batch_size, sent + batch_size
        if limit is not None and sent + held >= limit:
            break
    if held:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items`` produced in a background thread at most ``depth`` ahead of the consumer; an error
    in the producer is raised in the consumer, and a consumer that stops early stops the thread."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(error))

    thread = threading.Thread(target=produce, name="ptqcal-prefetch", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                queue.get_nowait()
            except Empty:
                break
        thread.join()


def _file_stats(paths: list[Path]) -> list:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else (str(p), -1, -1) for p in paths]


def _save_chunk(chunk: _Chunk, tmp: Path) -> None:
    with open(tmp, "wb") as handle:
        np.savez(handle, images=chunk.images, labels=chunk.labels, failed=np.array([str(p) for p in chunk.failed],
                                                                                  dtype=str))


def _load_chunk(path: Path, pixels: bool = True) -> _Chunk:
    with np.load(path) as stored:  # an npz reads each array only when asked for it
        return _Chunk(stored["images"] if pixels else np.empty((0,), np.uint8), stored["labels"],
                      tuple(Path(p) for p in stored["failed"]))

