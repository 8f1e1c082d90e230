"""Where a run's independent work runs: in this process (:class:`Local`), or as Ray tasks
(:class:`RayCluster`, ``run --ray``).

The run decides *what* is independent (:mod:`ptqcal.pipeline`): per model the export and the
calibration draws, per configuration the quantization, per configuration x shard the inference.
An executor only runs it. Every task reads and writes the run's content-addressed cache, so the
cache folder (and the images) must be on storage that every node sees: a task's result is a cache
entry like a local step's, written whole or not at all. A task Ray retries after its worker died
recomputes only what is not in the cache yet, and a driver killed mid-run resumes from it like a
local run. Logits shards come back through Ray's object store and are also cached, so the driver
assembles exactly the array a local run computes, under the same key.

Shards are batch-aligned: each starts at a multiple of the run's batch size and holds whole
batches, so every image is evaluated in the same batch as in a local run, and the logits are the
same bit for bit.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .cache import Cache
from .config import RunConfig
from .errors import UserError

SHARD_BATCHES = 4  # whole batches per inference task: small enough to spread, large enough to amortise a session
RETRIES = 3  # times Ray re-runs a task whose worker process died
LOCAL = "local"  # --ray without an address: a Ray instance started for the run, stopped after it
# Ray never reports usage statistics from a ptqcal run; single-machine mode keeps a local cluster on loopback
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class Executor(Protocol):
    """Where a run's independent work runs: what :class:`Local` and :class:`RayCluster` implement."""

    side_by_side: bool  # several models submit their work at once (else one model after another)

    def task_threads(self, cfg: RunConfig) -> int:
        """ORT's intra-op thread count inside one piece of work."""

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        """``fn(*call)`` for each call (whose first item is the run's cache); the results in order."""

    def warm_logits(self, cache: Cache, jobs: Sequence, cfg: RunConfig) -> None:
        """Compute ahead (or not) the logits of ``jobs`` (:class:`~ptqcal.steps.LogitsJob`) into the cache."""

    def close(self) -> None:
        """Release what the executor started."""


class Local:
    """Every piece of work in this process, one after another (a run without ``--ray``)."""

    side_by_side = False  # several models: one after another

    def task_threads(self, cfg: RunConfig) -> int:
        """ORT's thread count inside a task: the run's (0: one per physical core)."""
        return cfg.threads

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        """``fn(*call)`` for each call (whose first item is the run's cache), in order."""
        return [fn(*args) for args in calls]

    def warm_logits(self, cache: Cache, jobs: Sequence, cfg: RunConfig) -> None:
        """Nothing ahead: each job's logits are computed when the run asks for them."""

    def close(self) -> None:
        pass


def shards(count: int, batch_size: int, batches: int = SHARD_BATCHES) -> list[tuple[int, int]]:
    """(start, count) of batch-aligned shards covering ``count`` images."""
    size = batch_size * batches
    return [(start, min(size, count - start)) for start in range(0, count, size)]


def _readable(cache: Cache, pixels) -> None:
    """One line instead of a hang or a traceback when this node cannot see the run's storage."""
    where = socket.gethostname()
    if not cache.root.parent.is_dir():
        raise UserError(f"a Ray worker on {where} cannot see the run folder {cache.root.parent}: it must be on "
                        "storage every node sees")
    if pixels is not None and pixels.split.is_files and len(pixels.split) and not Path(pixels.split.images[0]).is_file():
        raise UserError(f"a Ray worker on {where} cannot read {pixels.split.images[0]}: the images must be on "
                        "storage every node sees")


def _call(fn: Callable, cache: Cache, *args) -> Any:
    _readable(cache, None)
    return fn(cache, *args)


def _shard(cache: Cache, job, pixels, cfg: RunConfig, start: int, count: int) -> np.ndarray:
    """One shard's logits, cached under its own key so that a resumed run does not recompute it.
    ``job`` travels without its pixels, which every shard of every job shares from one object."""
    from .steps import check_logits

    job = replace(job, pixels=pixels)
    _readable(cache, pixels)
    return cache.array(f"{job.kind}-shard", job.key(cfg, (start, count)),
                       lambda: job.compute(cfg, start, count, progress=False), check_logits)


def _index(cache: Cache, pixels, index: int) -> None:
    """Decode and cache one chunk of image files (the driver then reads only its labels)."""
    _readable(cache, pixels)
    pixels.chunk(index, pixels=False)


def _check_reachable(address: str, seconds: float = 5.0) -> None:
    """One line, at once, for a ``host:port`` nothing answers on (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: give the head node's host:port, 'auto' on a node of the cluster, or "
                        "nothing to start Ray on this machine")
    try:
        with socket.create_connection((host, int(port)), timeout=seconds):
            pass
    except OSError as exc:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or 'timed out'})") from None


class RayCluster:
    """Tasks on a Ray cluster: ``address`` is ``auto``, ``host:port``, or :data:`LOCAL` to start
    Ray on this machine, on the loopback address, for the run (every CPU; stopped by
    :meth:`close`). A Ray the caller already initialised is used as it is."""

    side_by_side = True  # several models: their runs submit their tasks at once (the driver waits on threads)

    def __init__(self, address: str):
        os.environ.update(RAY_ENVIRONMENT)  # before Ray is imported (it reads them then); a local cluster inherits them
        try:
            import ray
        except ImportError:
            raise UserError("--ray needs Ray: pip install 'ptqcal[ray]'") from None
        self.ray, self.connected = ray, not ray.is_initialized()  # a caller's own connection is left to the caller
        if self.connected and address not in (LOCAL, "auto"):
            _check_reachable(address)
        try:
            if self.connected:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR",
                         **({"num_cpus": os.cpu_count(), "include_dashboard": False, "_node_ip_address": "127.0.0.1"}
                            if address == LOCAL else {}))
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"--ray {address}: cannot connect to a Ray cluster ({' '.join(str(exc).split())[:200]})") \
                from None
        self._remote = ray.remote(max_retries=RETRIES)

    def task_threads(self, cfg: RunConfig) -> int:
        """A task holds one of Ray's CPUs, so ORT runs one thread in it (unless ``--threads`` says
        otherwise): tasks side by side would otherwise each start a thread per core and contend.
        ORT's CPU kernels split work by output, so the logits do not depend on it (tested)."""
        return cfg.threads or 1

    def _get(self, futures: list) -> list:
        try:
            return self.ray.get(futures)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
            raise cause from None

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        """``fn(*call)`` for each call (whose first item is the run's cache), as tasks; the results
        in order."""
        task = self._remote(_call).options(name=getattr(fn, "__name__", "task"))  # how Ray's dashboard lists it
        return self._get([task.remote(fn, *args) for args in calls])

    def warm_logits(self, cache: Cache, jobs: Sequence, cfg: RunConfig) -> None:
        """The logits of every job not cached yet, in batch-aligned shards across the cluster, with
        one progress bar over all their images; each job's whole array is then cached (the entry a
        local run writes)."""
        from tqdm.auto import tqdm

        from .progress import bar_disabled
        from .steps import check_logits

        task = self._remote(_shard).options(name="inference")
        pending = [job for job in jobs if not cache.has(job.kind, job.key(cfg), "npy")]
        shared = {id(job.pixels): self.ray.put(job.pixels) for job in pending}  # sent to the object store once
        files = {id(job.pixels): job.pixels for job in pending if job.pixels.split.is_files}
        # image files are decoded on the cluster, chunk by chunk: how many decoded decides the shards
        self.map(_index, [(cache, shared[key], index) for key, pixels in files.items()
                          for index in range(pixels.num_chunks)])
        inside = replace(cfg, threads=self.task_threads(cfg))
        work = [(job, [(task.remote(cache, replace(job, pixels=None), shared[id(job.pixels)], inside, start, count), count)
                       for start, count in shards(len(job.pixels.labels), cfg.batch_size)]) for job in pending]
        sizes = {future: count for _, parts in work for future, count in parts}
        waiting = list(sizes)
        with tqdm(total=sum(sizes.values()), desc="evaluate (Ray)", unit="img", disable=bar_disabled(cfg.progress),
                  leave=False) as bar:
            while waiting:
                done, waiting = self.ray.wait(waiting, num_returns=1)
                self._get(done)  # a failed shard raises here, not after the others
                bar.update(sizes[done[0]])
        for job, parts in work:
            logits = np.concatenate(self._get([future for future, _ in parts]))
            cache.array(job.kind, job.key(cfg), lambda: logits, check_logits)

    def close(self) -> None:
        """Stop the Ray started for the run, or disconnect from the cluster (which keeps running)."""
        if self.connected:
            self.ray.shutdown()


def make_executor(cfg: RunConfig) -> Executor:
    """The executor ``cfg`` asks for."""
    return Local() if cfg.ray is None else RayCluster(cfg.ray)
