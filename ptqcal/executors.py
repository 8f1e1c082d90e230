"""Where a run's independent work runs: in this process (:class:`Local`), or as Ray tasks
(:class:`RayCluster`, ``run --ray``).

The run decides *what* is independent (:mod:`ptqcal.pipeline`): per model the export and the
calibration draws, per configuration the quantization, per configuration x shard the inference.
An executor only runs it. Every task reads and writes the run's content-addressed cache, so the
cache folder (and the images) must be on storage that every node sees: a task's result is a cache
entry like a local step's, written whole or not at all. A task Ray retries after its worker died
recomputes only what is not in the cache yet, and a driver killed mid-run resumes from it like a
local run. Logits shards come back through Ray's object store and are also cached, so the driver
assembles exactly the array a local run computes, under the same key. A split's images (arrays,
or file paths) go to the object store once in a run, whatever number of tasks, calls, models and
corrupted copies of the images carry them (directly, or as a field of an argument: attribution's
work).

Shards are batch-aligned: each starts at a multiple of the run's batch size and holds whole
batches, so every image is evaluated in the same batch as in a local run, and the logits are the
same bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import sys
import tempfile
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .cache import Cache, array_digest, make_key
from .config import RunConfig
from .data.pixels import Pixels
from .data.splits import Dataset, Split
from .errors import UserError

SHARD_BATCHES = 4  # whole batches per inference task: small enough to spread, large enough to amortise a session
RETRIES = 3  # times Ray re-runs a task whose worker process died
LOCAL = "local"  # --ray without an address: a Ray instance started for the run, stopped after it
# Ray never reports usage statistics from a ptqcal run; single-machine mode keeps a local cluster on loopback
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class Executor(Protocol):
    """Where a run's independent work runs: what :class:`Local` and :class:`RayCluster` implement."""

    side_by_side: bool  # several models submit their work at once (else one model after another)
    runs_ahead: bool  # work handed over ahead runs then (else the run computes each piece when it asks for it)

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
    runs_ahead = False  # attribution and the search compute each measurement when they ask for it

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


@dataclass(frozen=True)
class _Detached:
    """A :class:`~ptqcal.data.Pixels` or :class:`~ptqcal.data.Dataset` as a task receives it: without
    its splits, whose objects in Ray's store every argument holding them shares (:meth:`RayCluster._ship`)."""

    value: Pixels | Dataset  # its splits None
    splits: dict[str, Any]  # field name: the split's ObjectRef


def _shipped_fields(arg, kind: type | tuple[type, ...]) -> dict[str, Any]:
    """The fields of the dataclass ``arg`` whose values are ``kind`` (none for anything else); only
    fields ``replace`` can set (an ``init=False`` field travels as it is)."""
    if not dataclasses.is_dataclass(arg) or isinstance(arg, type):
        return {}
    return {f.name: getattr(arg, f.name) for f in fields(arg) if f.init and isinstance(getattr(arg, f.name), kind)}


def _attached(arg):
    """``arg``, or the Pixels or Dataset it stands for whole again, also as a field of ``arg``. The
    splits' refs are nested in ``arg``, so Ray does not resolve them before the task runs: the task
    gets them here (arrays: read in place from the node's store, not copied), and the step sees what a
    local run sees."""
    if not isinstance(arg, _Detached):
        inside = _shipped_fields(arg, _Detached)
        return replace(arg, **{name: _attached(value) for name, value in inside.items()}) if inside else arg
    import ray

    return replace(arg.value, **dict(zip(arg.splits, ray.get(list(arg.splits.values())))))


def _call(fn: Callable, cache: Cache, *args) -> Any:
    _readable(cache, None)
    return fn(cache, *map(_attached, args))


def _shard(cache: Cache, job, pixels, cfg: RunConfig, start: int, count: int) -> np.ndarray:
    """One shard's logits, cached under its own key so that a resumed run does not recompute it.
    ``job`` travels without its pixels, which every shard of every job shares from one object."""
    from .steps import check_logits

    pixels = _attached(pixels)
    job = replace(job, pixels=pixels)
    _readable(cache, pixels)
    return cache.array(f"{job.kind}-shard", job.key(cfg, (start, count)),
                       lambda: job.compute(cfg, start, count, progress=False), check_logits)


def _index(cache: Cache, pixels, index: int) -> None:
    """Decode and cache one chunk of image files (the driver then reads only its labels)."""
    _readable(cache, pixels)
    pixels.chunk(index, pixels=False)


def _check_reachable(address: str, seconds: float = 5.0, shown: str | None = None) -> None:
    """One line, at once, for a ``host:port`` nothing answers on (Ray itself retries for minutes);
    ``shown``: how the line names it (the address as given)."""
    host, _, port = address.rpartition(":")
    shown = shown or address
    if not host or not port.isdigit():
        raise UserError(f"--ray {shown}: give the head node's host:port, 'auto' on a node of the cluster, or "
                        "nothing to start Ray on this machine")
    try:
        with socket.create_connection((host, int(port)), timeout=seconds):
            pass
    except OSError as exc:
        raise UserError(f"--ray {shown}: no Ray cluster answers there ({exc.strerror or 'timed out'})") from None


def _check_token(ray, address: str, shown: str | None = None) -> None:
    """One line, at once, for a cluster that wants an authentication token this environment does not
    give it: ``ray.init`` would retry for 20 s, a log line a second, and then name no reason. The
    probe is Ray's own first call (the cluster's id from its GCS, with the token Ray would send),
    which fails at once; the line Ray's C++ client logs for it is held back."""
    try:
        from ray._raylet import AuthenticationTokenLoader, GcsClient
    except ImportError:  # Ray's internals moved: ray.init says what it says
        return
    try:
        given = AuthenticationTokenLoader.instance().has_token()
    except ray.exceptions.AuthenticationError:  # token authentication on here, and no token found
        raise UserError(_token_message(shown or address, given=False)) from None
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:  # unlinked at once: nothing stays in $TMPDIR
            os.dup2(sink.fileno(), 2)
            GcsClient(address=address)
    except ray.exceptions.AuthenticationError:
        raise UserError(_token_message(shown or address, given)) from None
    except Exception:  # noqa: BLE001 - anything else is ray.init's to say
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _auto_address(address: str) -> str:
    """The ``host:port`` Ray connects ``auto`` to ($RAY_ADDRESS, else the cluster last started on this
    node), found as Ray finds it; one line when there is none."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # Ray's internals moved: ray.init says what it says
        return address
    try:
        return canonicalize_bootstrap_address(address) or address
    except (ConnectionError, ValueError) as exc:
        raise UserError(f"--ray {address}: no Ray cluster found from this node ({' '.join(str(exc).split())[:160]}); "
                        "give the head node's host:port") from None


def _token_message(address: str, given: bool) -> str:
    where = "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
    if given:
        return (f"--ray {address}: the Ray cluster refuses this environment's authentication token: give its "
                f"token in {where}")
    return (f"--ray {address}: the Ray cluster requires an authentication token and this environment has none: "
            f"set RAY_AUTH_MODE=token and give the cluster's token in {where}")


def _session_folder() -> Path:
    """A folder of the run's own for the session of the Ray it starts (Ray's default, $TMPDIR/ray,
    stays behind). Ray's Unix sockets live at <folder>/session_<date>_<pid>/sockets/<name>, and a
    socket path holds at most 107 bytes: a long $TMPDIR gives way to /tmp."""
    base = tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix="ptqcal-ray-", dir=base if len(base) <= 40 else "/tmp"))


class RayCluster:
    """Tasks on a Ray cluster: ``address`` is ``auto``, ``host:port``, or :data:`LOCAL` to start
    Ray on this machine, on the loopback address, for the run (every CPU; its session in a folder
    of its own; stopped and the folder removed by :meth:`close`). A Ray the caller already
    initialised is used as it is."""

    side_by_side = True  # several models: their runs submit their tasks at once (the driver waits on threads)
    runs_ahead = True  # attribution's and the search's measurements are tasks ahead of the run reading them

    def __init__(self, address: str):
        os.environ.update(RAY_ENVIRONMENT)  # before Ray is imported (it reads them then); a local cluster inherits them
        try:
            import ray
        except ImportError:
            raise UserError("--ray needs Ray: pip install 'ptqcal[ray]'") from None
        self.ray, self.connected = ray, not ray.is_initialized()  # a caller's own connection is left to the caller
        self.session: Path | None = _session_folder() if self.connected and address == LOCAL else None
        try:
            if self.connected:
                self._connect(address)
        except BaseException:
            self._remove_session()
            raise
        self._remote = ray.remote(max_retries=RETRIES)
        # a split's content: its ref in Ray's object store, one copy a run whichever objects hold it
        self._stored: dict[str, Any] = {}
        # id(split): (a weak reference to it, its content): each split object is hashed once
        self._contents: dict[int, tuple[weakref.ref, str]] = {}
        self._lock = threading.Lock()  # several models' runs submit their tasks at once

    def _connect(self, address: str) -> None:
        if address != LOCAL:  # "auto" probed at the address Ray would take for it
            found = _auto_address(address) if address == "auto" else address
            shown = f"auto ({found})" if address == "auto" else address
            _check_reachable(found, shown=shown)
            _check_token(self.ray, found, shown)
        local = {"num_cpus": os.cpu_count(), "include_dashboard": False, "_node_ip_address": "127.0.0.1",
                 "_temp_dir": str(self.session)}
        try:
            self.ray.init(address=address, log_to_driver=False, logging_level="ERROR",
                          **(local if address == LOCAL else {}))
        except self.ray.exceptions.AuthenticationError:
            raise UserError(_token_message(address, given=False)) from None
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"--ray {address}: cannot connect to a Ray cluster ({' '.join(str(exc).split())[:200]})") \
                from None

    def _remove_session(self) -> None:
        if self.session is not None:
            shutil.rmtree(self.session, ignore_errors=True)

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

    def _content(self, split: Split) -> str:
        """What ``split`` holds (its images' digest, or its paths, and its labels'), computed once for
        each split object (held weakly: the run lets go of its splits as before)."""
        known = self._contents.get(id(split))
        if known is not None and known[0]() is split:
            return known[1]
        images = make_key([str(path) for path in split.images]) if split.is_files else array_digest(split.images)
        content = make_key(images, array_digest(split.labels))
        self._contents[id(split)] = (weakref.ref(split), content)
        return content

    def _ship(self, value: Pixels | Dataset) -> _Detached:
        """What a task receives for ``value``: it without its splits, and their refs. Each split's
        content goes to the object store once in the executor's life (a run), however many Pixels (the
        clean images, each corrupted copy), Datasets (each model's, side by side and timed) and calls
        carry it: 7.5 GB of ImageNet arrays under 75 corruption cells are 7.5 GB in the store."""
        splits = {f.name: getattr(value, f.name) for f in fields(value) if isinstance(getattr(value, f.name), Split)}
        contents = {name: self._content(split) for name, split in splits.items()}  # seconds: not under the lock
        with self._lock:
            for name, split in splits.items():
                if contents[name] not in self._stored:
                    self._stored[contents[name]] = self.ray.put(split)
            refs = {name: self._stored[contents[name]] for name in splits}
        return _Detached(replace(value, **dict.fromkeys(splits)), refs)

    def _detach(self, arg: Any) -> Any:
        """``arg`` as a task receives it: a Pixels or Dataset, or one as a field of ``arg`` (a model's
        attribution work and its images), as :meth:`_ship` makes it."""
        if isinstance(arg, (Pixels, Dataset)):
            return self._ship(arg)
        inside = _shipped_fields(arg, (Pixels, Dataset))
        return replace(arg, **{name: self._ship(value) for name, value in inside.items()}) if inside else arg

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        """``fn(*call)`` for each call (whose first item is the run's cache), as tasks; the results
        in order. An argument several calls share (the same object: a pixel stream, a model's
        attribution work) goes to the object store once, not once a task; a Pixels or Dataset goes
        as :meth:`_detach` makes it."""
        task = self._remote(_call).options(name=getattr(fn, "__name__", "task"))  # how Ray's dashboard lists it
        shipped: dict[int, Any] = {}
        for arg in (arg for args in calls for arg in args):
            if id(arg) not in shipped:
                shipped[id(arg)] = self._detach(arg)
        calls = [tuple(shipped.get(id(arg), arg) for arg in args) for args in calls]
        uses = Counter(id(arg) for args in calls for arg in args)
        as_is = (str, int, float, Path, type(None), self.ray.ObjectRef)  # a ref: in the store already (put refuses it)
        objects = {id(arg): arg for args in calls for arg in args if uses[id(arg)] > 1 and not isinstance(arg, as_is)}
        shared = {key: self.ray.put(arg) for key, arg in objects.items()}
        return self._get([task.remote(fn, *(shared.get(id(arg), arg) for arg in args)) for args in calls])

    def warm_logits(self, cache: Cache, jobs: Sequence, cfg: RunConfig) -> None:
        """The logits of every job not cached yet, in batch-aligned shards across the cluster, with
        one progress bar over all their images; each job's whole array is then cached (the entry a
        local run writes)."""
        from tqdm.auto import tqdm

        from .progress import bar_disabled
        from .steps import check_logits

        task = self._remote(_shard).options(name="inference")
        pending = [job for job in jobs if not cache.has(job.kind, job.key(cfg), "npy")]
        streams = {id(job.pixels): job.pixels for job in pending}
        shared = {key: self.ray.put(self._ship(pixels)) for key, pixels in streams.items()}  # each sent once
        files = {key: pixels for key, pixels in streams.items() if pixels.split.is_files}
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
        """Stop the Ray started for the run (and remove its session folder), or disconnect from the
        cluster (which keeps running)."""
        self._stored.clear()
        if self.connected:
            self.ray.shutdown()
        self._remove_session()


def make_executor(cfg: RunConfig) -> Executor:
    """The executor ``cfg`` asks for."""
    return Local() if cfg.ray is None else RayCluster(cfg.ray)
