"""``run --ray``: the same run on a real Ray cluster on the loopback address, with identical results,
a worker killed mid-task, and nothing of Ray without the flag.

The cluster is started with ``ray start --head`` in Ray's single-machine mode, which keeps every
address on 127.0.0.1 (checked with ``ray.nodes()`` before any work is sent), with usage
statistics off; it is stopped when the module's tests end.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import save_classifier, tiny_onnx_classifier
from ptqcal.executors import RAY_ENVIRONMENT, shards

START_SECONDS = 90  # bound on `ray start` and on waiting for a task to show up


def test_shards_are_whole_batches_and_cover_every_image_once():
    for count, batch in ((1000, 64), (64, 64), (65, 64), (1, 256)):
        parts = shards(count, batch, batches=3)
        assert sum(n for _, n in parts) == count
        assert [start for start, _ in parts] == list(range(0, count, 3 * batch))  # batch-aligned starts
        assert all(n % batch == 0 for _, n in parts[:-1])  # only the last shard ends in a partial batch


def test_a_task_is_sent_only_the_fields_it_can_be_rebuilt_from():
    """What a Pixels or Dataset inside an argument is looked for in: the fields ``replace`` sets again."""
    from ptqcal.executors import _shipped_fields

    @dataclasses.dataclass
    class Work:
        first: int
        name: str
        derived: int = dataclasses.field(init=False, default=3)

    assert _shipped_fields(Work(1, "x"), int) == {"first": 1}  # not the derived field, which replace rejects
    assert _shipped_fields(Work, int) == {} and _shipped_fields(5, int) == {}


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_a_run_without_the_flag_never_imports_ray_and_the_flag_without_ray_is_one_line(tmp_path):
    pytest.importorskip("sklearn")
    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    args = ["run", "--model", str(model), "--dataset", "digits", "--preprocess", "digits", "--weight-bits", "8",
            "--no-timing", "--no-progress", "--quiet"]
    completed = _python(f"""
        import sys
        from ptqcal.cli import main
        assert main({args + ["--out", str(tmp_path / "plain")]!r}) == 0
        print("ray" in sys.modules)
    """)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "False"
    blocked = _python(f"""
        import sys
        sys.modules["ray"] = None  # as if the extra were not installed
        from ptqcal.cli import main
        sys.exit(main({args + ["--out", str(tmp_path / "ray"), "--ray"]!r}))
    """)
    assert blocked.returncode == 2
    assert blocked.stderr.strip() == "ptqcal: error: --ray needs Ray: pip install 'ptqcal[ray]'"
    assert not (tmp_path / "ray").exists()


@pytest.mark.parametrize("address, message", [
    ("nonsense", "--ray nonsense: give the head node's host:port"),
    ("127.0.0.1:1", "--ray 127.0.0.1:1: no Ray cluster answers there (Connection refused)"),
    ("auto", "--ray auto (127.0.0.1:1): no Ray cluster answers there (Connection refused)"),  # $RAY_ADDRESS
])
def test_an_address_nothing_answers_on_is_one_line_at_once(address, message, tmp_path):
    """Not Ray's minutes of retries: a port probe first (of the address given, or of the one Ray
    takes for ``auto``). In a child process, so that this one does not import Ray before the cluster
    tests set its environment."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed")
    completed = _python(f"""
        import os, sys
        os.environ["RAY_ADDRESS"] = "127.0.0.1:1"
        from ptqcal.cli import main
        sys.exit(main(["run", "--ray", {address!r}, "--out", {str(tmp_path / "run")!r}]))
    """)
    error = completed.stderr.strip()
    assert completed.returncode == 2 and error.startswith(f"ptqcal: error: {message}")
    assert len(error.splitlines()) == 1 and not (tmp_path / "run").exists()


# --- a real cluster ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """``ray start --head`` on 127.0.0.1 with 2 CPUs and token authentication (a token of its own,
    not the user's ~/.ray one); its address, with this process's environment set to reach it;
    stopped afterwards."""
    if importlib.util.find_spec("ray") is None:  # not imported here: Ray reads its settings when imported
        pytest.skip("Ray is not installed (pip install 'ptqcal[ray]')")
    temp = tmp_path_factory.mktemp("ray")
    (temp / "token").write_text(secrets.token_hex(32))
    settings = {**RAY_ENVIRONMENT, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp / "token")}
    port, env = _free_port(), {**os.environ, **settings}
    ray_bin = Path(sys.executable).with_name("ray")
    start = [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp / "t")]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        yield from _cluster(start, port, env, ray_bin)


def _cluster(start: list[str], port: int, env: dict, ray_bin: Path):
    try:
        subprocess.run(start, check=True, capture_output=True, timeout=START_SECONDS, env=env)
        address = f"127.0.0.1:{port}"
        nodes = _python(f"""
            import ray
            ray.init(address={address!r}, logging_level="ERROR")
            print(sorted({{n["NodeManagerAddress"] for n in ray.nodes()}}))
            ray.shutdown()
        """)
        assert nodes.stdout.strip() == "['127.0.0.1']", nodes.stderr  # loopback only, before any work is sent
        yield address
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=START_SECONDS, env=env)


def _same_results(a: Path, b: Path) -> None:
    assert (a / "metrics.json").read_text() == (b / "metrics.json").read_text()
    with np.load(a / "logits.npz") as left, np.load(b / "logits.npz") as right:
        assert sorted(left.files) == sorted(right.files)
        for name in left.files:
            np.testing.assert_array_equal(left[name], right[name])


def _ptqcal(*args: str) -> None:
    completed = subprocess.run([sys.executable, "-m", "ptqcal", *args], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.slow
def test_the_default_sweep_on_the_cluster_equals_the_local_run(ray_cluster, default_run, tmp_path):
    common = ["run", "--no-progress", "--quiet", "--no-timing", "--cache-dir", str(default_run.models)]
    _ptqcal(*common, "--out", str(tmp_path / "local"))  # both runs reuse the two models the session trained
    _ptqcal(*common, "--out", str(tmp_path / "ray"), "--ray", ray_cluster)
    for model in ("digits_resnet8", "digits_resnet8_ls"):
        _same_results(tmp_path / "local" / model, tmp_path / "ray" / model)


def _heavy_classifier(path: Path) -> Path:
    """Six 128-channel 3x3 convolutions on 8x8 inputs: about 0.1 GFLOP per image, so that one
    inference task lasts long enough to be killed while it runs."""
    rng = np.random.default_rng(0)
    inits, nodes, current, channels = [], [], "input", 1
    for index in range(6):
        weight = rng.normal(0, np.sqrt(2 / (9 * channels)), (128, channels, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes += [helper.make_node("Conv", [current, f"w{index}"], [f"c{index}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{index}"], [f"r{index}"])]
        current, channels = f"r{index}", 128
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (10, 128)).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [current], ["pool"]), helper.make_node("Flatten", ["pool"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return save_classifier(path, "heavy", nodes, inits, 10)


def _running(title: str) -> list[int]:
    """Process ids whose command line starts with ``title`` (Ray names a busy worker ray::<task name>)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title.encode()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _digit_files(folder: Path, digits, count: int) -> Path:
    """``count`` real digits as PNG files in class sub-folders (a dataset of image files)."""
    from PIL import Image

    for index in range(count):
        image, label = digits.eval.images[index], digits.eval.labels[index]
        (folder / f"{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(image * 255 / 16)).save(folder / f"{label}" / f"{index:04d}.png")
    return folder


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_a_killed_driver_resumes_with_the_same_results(ray_cluster, digits,
                                                                                      tmp_path):
    """On image files, which the cluster decodes chunk by chunk before the shards run."""
    model = _heavy_classifier(tmp_path / "heavy.onnx")
    data = _digit_files(tmp_path / "digits", digits, 832)
    args = ["run", "--model", str(model), "--dataset", "folder", "--data-dir", str(data), "--preprocess", "unit",
            "--weight-bits", "8", "--batch-size", "64", "--calib-size", "64", "--no-timing", "--check-images", "0",
            "--no-progress", "--quiet"]
    _ptqcal(*args, "--out", str(tmp_path / "local"))
    driver = subprocess.Popen([sys.executable, "-m", "ptqcal", *args, "--out", str(tmp_path / "ray"), "--ray",
                               ray_cluster], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, victims = time.monotonic() + START_SECONDS, []
        while not victims and time.monotonic() < deadline and driver.poll() is None:
            victims = _running("ray::inference")
            time.sleep(0.05)
        assert victims, "no inference task was seen running"
        time.sleep(0.3)  # well inside the task (a shard of 256 images takes seconds)
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stderr
    _same_results(tmp_path / "local", tmp_path / "ray")
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["config"]["ray"] == ray_cluster

    # the driver killed once a shard is cached: the same command resumes from the cache
    out = tmp_path / "resumed"
    driver = subprocess.Popen([sys.executable, "-m", "ptqcal", *args, "--out", str(out), "--ray", ray_cluster],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not list(out.glob("cache/logits-shard-*.npy")) and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
        assert driver.poll() is None, "the run ended before a shard was cached"
        driver.kill()
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not (out / "report.md").exists()
    resumed = subprocess.run([sys.executable, "-m", "ptqcal", *[a for a in args if a != "--quiet"], "--out", str(out),
                              "--ray", ray_cluster], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_results(tmp_path / "local", out)


def test_a_worker_that_cannot_see_the_run_folder_says_so_in_one_line(ray_cluster, tmp_path):
    from ptqcal.cache import Cache
    from ptqcal.executors import RayCluster
    from ptqcal.errors import UserError

    cluster = RayCluster(ray_cluster)
    try:
        assert cluster.map(repr, [(Cache(tmp_path / "cache"),)])[0].startswith("<ptqcal.cache.Cache")  # a folder it sees
        with pytest.raises(UserError, match=r"cannot see the run folder .*gone: it must be on storage every node sees"):
            cluster.map(repr, [(Cache(tmp_path / "gone" / "cache"),)])
    finally:
        cluster.close()



def test_a_quantization_writes_nothing_beside_the_model_it_reads(tmp_path):
    """Ray runs a model's quantizations side by side, all reading one prepared model: ORT's
    quantizer writes and deletes "<input>-inferred.onnx" beside its input, which they would share
    (and one would delete under another). Nothing may be created or removed in the input's folder."""
    from ptqcal.quantize import ArrayDataReader, QuantSpec, collect_histograms, compute_ranges, prepare, quantize_qdq

    source = tmp_path / "source"
    source.mkdir()
    prepared = prepare(tiny_onnx_classifier(tmp_path / "tiny.onnx"), source / "prepared.onnx")
    x = np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32)
    ranges = compute_ranges(collect_histograms(prepared, ArrayDataReader("input", x, 16), progress=False), "mse")
    before = (sorted(source.iterdir()), source.stat().st_mtime_ns)
    for bits in (8, 4):
        quantize_qdq(prepared, tmp_path / "out" / f"a8w{bits}.onnx", ranges, QuantSpec(bits))
    assert (sorted(source.iterdir()), source.stat().st_mtime_ns) == before


# --- attribution and the search as tasks; what --ray leaves behind; a token it lacks -------------

def _fail(*args, **kwargs):
    raise AssertionError("the driver computed what a task should have")


@pytest.mark.slow
def test_attribution_and_the_search_as_tasks_give_the_numbers_of_the_local_run(ray_cluster, digits, tmp_path,
                                                                                 monkeypatch):
    """Every (layer, bits) effect and every model the search measures is a task: the driver, which
    here computes none of them (its own ways to are broken), writes the run a local run writes."""
    import ptqcal.quantize
    from ptqcal import steps
    from ptqcal.cli import main
    from ptqcal.evaluate import attribution
    from ptqcal.executors import RayCluster
    from test_mixed import _mlp_with_a_fragile_layer

    model = _mlp_with_a_fragile_layer(tmp_path / "mlp.onnx", digits)
    args = ["run", "--model", str(model), "--dataset", "digits", "--preprocess", "digits", "--weight-bits", "8", "4",
            "--attribute", "--max-confident-swaps", "1", "--attribution-size", "400", "--no-timing", "--check-images",
            "0", "--no-progress", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    cluster = RayCluster(ray_cluster)  # the run's executor joins this connection
    try:  # the driver cannot measure a layer or a searched model itself: the pipeline hands both to the cluster
        monkeypatch.setattr(attribution._LayerRuns, "effect", _fail)
        monkeypatch.setattr(ptqcal.quantize, "quantize_qdq", _fail)
        compute = steps.LogitsJob.compute
        monkeypatch.setattr(steps.LogitsJob, "compute",
                            lambda job, *a, **k: _fail() if job.desc == "mixed search" else compute(job, *a, **k))
        assert main([*args, "--out", str(tmp_path / "ray"), "--ray", ray_cluster]) == 0
    finally:
        cluster.close()
    _same_results(tmp_path / "local", tmp_path / "ray")
    local, ray = (json.loads((tmp_path / run / "run.json").read_text()) for run in ("local", "ray"))
    assert ray["attribution"] == local["attribution"] and len(local["attribution"]["effects"]) == 4 * 2
    assert ray["mixed"] == local["mixed"] and len(local["mixed"]["steps"]) > 2  # the bisection went past its ends


def _without(*names: str) -> dict:
    return {key: value for key, value in os.environ.items() if key not in names}


@pytest.mark.parametrize("setting, message, auto", [
    ({}, "requires an authentication token and this environment has none", False),
    ({"RAY_AUTH_MODE": "token"}, "requires an authentication token and this environment has none", False),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "refuses this environment's authentication token", False),
    ({}, "requires an authentication token and this environment has none", True),
])
def test_a_cluster_that_wants_a_token_this_environment_lacks_is_one_line_at_once(setting, message, auto, ray_cluster,
                                                                                   tmp_path):
    """The fixture's cluster authenticates with a token; a driver without it (no token anywhere:
    HOME is empty), or with another, stops at once with one line, before Ray's 20 s of retries;
    ``--ray auto`` is probed at the address Ray takes for it ($RAY_ADDRESS here)."""
    env = {**_without("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"), "HOME": str(tmp_path), **setting,
           **({"RAY_ADDRESS": ray_cluster} if auto else {})}
    given, shown = ("auto", f"auto ({ray_cluster})") if auto else (ray_cluster, ray_cluster)
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "ptqcal", "run", "--ray", given, "--out",
                                str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env)
    error = completed.stderr.strip()
    assert completed.returncode == 2 and error.startswith(f"ptqcal: error: --ray {shown}: the Ray cluster ")
    assert message in error and "RAY_AUTH_TOKEN" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists() and time.monotonic() - started < 15


def test_ray_started_for_the_run_keeps_its_session_in_a_folder_it_removes(tmp_path):
    """``--ray`` alone: Ray's session (sockets, logs) goes into a folder of the run's own inside
    $TMPDIR, which is empty again once the executor is closed (Ray's default, $TMPDIR/ray, stays
    behind). A short $TMPDIR: Ray's socket paths must fit 107 bytes."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed")
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="pq", dir="/tmp"))
    try:
        completed = _python(f"""
            from pathlib import Path
            from ptqcal.cache import Cache
            from ptqcal.executors import LOCAL, RayCluster
            cluster = RayCluster(LOCAL)
            assert cluster.map(repr, [(Cache(Path({str(tmp_path / "cache")!r})),)])[0].startswith("<ptqcal.cache.Cache")
            print(cluster.session, sorted(p.name for p in cluster.session.iterdir()))
            cluster.close()
        """, env={**_without("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"), "TMPDIR": str(folder)})
        assert completed.returncode == 0, completed.stderr[-3000:]
        session, inside = completed.stdout.strip().splitlines()[-1].split(" ", 1)
        assert Path(session).parent == folder and "session_latest" in inside  # Ray's session was there
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_corruptions_on_the_cluster_equal_the_local_run(ray_cluster, tmp_path):
    """Image files under two corruptions: the cluster decodes and corrupts the chunks (48 evaluation
    images, 42 to a chunk) as tasks and shards every configuration's logits on them; results as local."""
    pytest.importorskip("imagecorruptions")
    from PIL import Image

    from ptqcal.data.pixels import CHUNK_BYTES
    from test_shift import _classifier

    rng = np.random.default_rng(2)
    for index in range(64):
        folder = tmp_path / "images" / f"{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        Image.fromarray(np.repeat(np.repeat(coarse, 64, axis=0), 64, axis=1)).save(folder / f"{index:03d}.png")
    assert 64 - 16 > CHUNK_BYTES // (3 * 512 * 512)  # the evaluation images (all but 16) span two chunks
    model = _classifier(tmp_path / "model.onnx", size=512, stride=8)
    common = ["run", "--model", str(model), "--dataset", "folder", "--data-dir",
              str(tmp_path / "images"), "--preprocess", "unit", "--calib-size", "16", "--weight-bits", "8", "4",
              "--corruptions", "gaussian_noise", "contrast", "--severities", "2", "--no-progress", "--quiet",
              "--no-timing"]
    _ptqcal(*common, "--out", str(tmp_path / "local"))
    _ptqcal(*common, "--out", str(tmp_path / "ray"), "--ray", ray_cluster)
    _same_results(tmp_path / "local", tmp_path / "ray")
    with np.load(tmp_path / "ray" / "logits.npz") as stored:
        assert {"shift:gaussian_noise@2:a8w4", "shift:contrast@2:float"} <= set(stored.files)


def _holds(value, array: np.ndarray, depth: int = 0) -> bool:
    """Whether ``value`` (through dataclasses, tuples, lists and dicts) holds an array equal to ``array``."""
    if isinstance(value, np.ndarray):
        return value.shape == array.shape and np.array_equal(value, array)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inside = [getattr(value, field.name) for field in dataclasses.fields(value)]
    else:
        inside = list(value.values()) if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else []
    return depth < 5 and any(_holds(item, array, depth + 1) for item in inside)


@pytest.mark.slow
def test_an_array_dataset_goes_to_the_object_store_once_in_a_run(ray_cluster, tmp_path, monkeypatch):
    """An .npz's evaluation images, clean, under four corruption cells (each a Pixels of its own on the
    same split), in the export task's dataset and in attribution's work (all 40: fewer than its size) go
    to Ray's object store once in the run, never inline in a task's arguments; results as a local run's."""
    pytest.importorskip("imagecorruptions")
    import ray
    from ray.remote_function import RemoteFunction

    from ptqcal.cli import main
    from ptqcal.executors import RayCluster
    from test_shift import _classifier

    rng = np.random.default_rng(3)
    images = np.repeat(np.repeat(rng.integers(0, 256, (64, 8, 8, 3)).astype(np.uint8), 4, axis=1), 4, axis=2)
    np.savez(tmp_path / "data.npz", images=images[:40], labels=rng.integers(0, 4, 40), calib_images=images[40:],
             calib_labels=rng.integers(0, 4, 24))
    args = ["run", "--model", str(_classifier(tmp_path / "model.onnx")), "--dataset", str(tmp_path / "data.npz"),
            "--preprocess", "unit", "--weight-bits", "8", "4", "--corruptions", "contrast", "gaussian_noise",
            "--severities", "1", "3", "--attribute", "--check-images", "0", "--no-progress", "--quiet", "--no-timing"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    held, inline, put, submit = [], [], ray.put, RemoteFunction._remote

    def counted(value, *rest, **options):
        held.append(_holds(value, images[:40]))
        return put(value, *rest, **options)

    def submitted(self, args=None, kwargs=None, **options):  # what a task gets inline Ray would put itself
        inline.append(_holds(list(args or ()), images[:40]))
        return submit(self, args, kwargs, **options)

    cluster = RayCluster(ray_cluster)  # the run's executor joins this connection
    try:
        monkeypatch.setattr(ray, "put", counted)
        monkeypatch.setattr(RemoteFunction, "_remote", submitted)
        assert main([*args, "--out", str(tmp_path / "ray"), "--ray", ray_cluster]) == 0
    finally:
        cluster.close()
    assert sum(held) == 1 and len(held) > 1 and inline and not any(inline)  # once, and never inline
    _same_results(tmp_path / "local", tmp_path / "ray")
    local, ray = (json.loads((tmp_path / run / "run.json").read_text()) for run in ("local", "ray"))
    assert ray["attribution"] == local["attribution"] and local["attribution"]["effects"]
