"""The run folder's cache: hits, misses, invalidation, and resuming after SIGKILL."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ptqcal.cache import Cache, make_key
from ptqcal.cli import main

from conftest import tiny_onnx_classifier

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_cache_entries_are_computed_once(tmp_path):
    cache = Cache(tmp_path)
    calls = []
    first = cache.array("x", make_key(1), lambda: calls.append(1) or np.arange(3))
    again = cache.array("x", make_key(1), lambda: calls.append(1) or np.arange(5))
    np.testing.assert_array_equal(first, again)
    assert calls == [1] and (cache.hits, cache.misses) == (1, 1)
    assert make_key(1) != make_key(2) and make_key({"a": 1, "b": 2}) == make_key({"b": 2, "a": 1})


def test_a_failing_entry_leaves_nothing(tmp_path):
    cache = Cache(tmp_path)

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.file("x", "k", "txt", broken)
    assert not list(tmp_path.iterdir())


def _run(model, out, *extra):
    return main(["run", "--model", str(model), "--out", str(out), "--no-progress", "--calib-size", "48",
                 "--dataset", "digits", "--preprocess", "digits",
                 "--calib-method", "minmax", *extra])


def _computed(capsys) -> tuple[int, int]:
    line = next(text for text in capsys.readouterr().out.splitlines() if text.startswith("[ptqcal] cache:"))
    reused, computed = (int(w) for w in line.replace(",", "").split() if w.isdigit())
    return reused, computed


def _entries(cache: Path) -> dict[str, int]:
    """Cache entry -> its modification time (seals and the report's reuse stamp left out)."""
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix not in (".sha256", ".done")}


def _kind(name: str) -> str:
    return name.rsplit("-", 1)[0]


@pytest.mark.slow
def test_hits_misses_and_invalidation(tmp_path, capsys):
    pytest.importorskip("sklearn")
    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    out = tmp_path / "run"
    assert _run(model, out, "--weight-bits", "8", "4") == 0
    assert _computed(capsys)[0] == 0
    first_metrics, first = (out / "metrics.json").read_bytes(), _entries(out / "cache")

    assert _run(model, out, "--weight-bits", "8", "4") == 0
    assert _computed(capsys)[1] == 0, "the same command recomputes nothing"
    assert (out / "metrics.json").read_bytes() == first_metrics
    assert _entries(out / "cache") == first

    assert _run(model, out, "--weight-bits", "8", "4", "6") == 0
    after = _entries(out / "cache")
    assert {k: v for k, v in after.items() if k in first} == first, "nothing already computed was rewritten"
    new = sorted(_kind(name) for name in set(after) - set(first))
    # the a8w6 model, its logits and their session.run speed, its simulated check logits (the deployed
    # ones are its logits' first rows), its logits on the held-out (calibration) images the float
    # fallback guard is fitted on, its size and speed, and the run's timing
    assert new == ["calib-logits", "check-logits", "deployment", "logits", "quantized", "seconds", "throughput"]
    assert (out / "model_a8w6.onnx").exists()

    before_seed = _entries(out / "cache")
    assert _run(model, out, "--weight-bits", "8", "4", "--seed", "1") == 0
    new = {_kind(name) for name in set(_entries(out / "cache")) - set(before_seed)}
    # another calibration draw: new calibration images, histograms and everything quantized; the
    # float model, its preparation and its logits on the (unchanged) evaluation images are reused
    assert {"calib-logits", "histograms", "quantized", "logits", "check-logits"} <= new
    assert not new & {"prepared", "float"}
    float_logits = [name for name in before_seed if name.startswith("logits-")]
    assert all(name in _entries(out / "cache") for name in float_logits)


def _wait_for(pattern: str, folder: Path, process: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if list(folder.glob(pattern)):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[str], Path]:
    """A run's command, and the folder of that run left to finish."""
    pytest.importorskip("sklearn")
    folder = tmp_path_factory.mktemp("uninterrupted")
    model = tiny_onnx_classifier(folder / "tiny.onnx", classes=10)
    args = [sys.executable, "-m", "ptqcal", "run", "--model", str(model), "--no-progress", "--calib-size", "48",
            "--dataset", "digits", "--preprocess", "digits", "--weight-bits", "8", "6", "4", "3", "--calib-method", "mse"]
    subprocess.run(args + ["--out", str(folder / "reference")], check=True, capture_output=True)
    return args, folder / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["histograms-*", "quantized-*", "logits-*"])
def test_resume_after_sigkill_gives_identical_metrics(stage, uninterrupted, tmp_path):
    args, reference = uninterrupted
    _kill_at_and_resume(args, stage, tmp_path / "killed", reference)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def _kill_at_and_resume(args: list[str], stage: str, out: Path, reference: Path) -> None:
    """Start the run, SIGKILL it once a cache entry matching ``stage`` exists, run it again, and
    check it gives the reference run's metrics, byte for byte."""
    process = subprocess.Popen(args + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reached = _wait_for(stage, out / "cache", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert reached, f"the run ended before writing {stage}"
    # an entry being written when the kill came exists only under its hidden temporary name
    entries = [p for p in (out / "cache").iterdir() if not p.name.startswith(".")]
    assert entries and all(p.stat().st_size > 0 for p in entries)
    assert not (out / "report.md").exists()

    subprocess.run(args + ["--out", str(out)], check=True, capture_output=True)
    assert not list((out / "cache").glob(".*.tmp"))
    assert (out / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pixels-*", "calib-logits-*"])
def test_streamed_image_files_resume_after_sigkill(stage, tmp_path, digits):
    """A run over image files (decoded chunk by chunk into the cache) killed after its first pixel
    chunk or during its evaluation resumes to the same metrics."""
    from PIL import Image

    data = tmp_path / "images"
    for index, (image, label) in enumerate(zip(digits.eval.images[:300], digits.eval.labels[:300])):
        (data / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.astype(np.uint8), mode="L").save(data / str(label) / f"{index}.png")
    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    args = [sys.executable, "-m", "ptqcal", "run", "--model", str(model), "--no-progress", "--calib-size", "48",
            "--dataset", "folder", "--data-dir", str(data), "--preprocess", "digits", "--resize", "0",
            "--weight-bits", "8", "4"]
    reference = tmp_path / "reference"
    subprocess.run(args + ["--out", str(reference)], check=True, capture_output=True)
    _kill_at_and_resume(args, stage, tmp_path / "killed", reference)


def test_a_killed_scratch_folder_is_removed_by_its_marker_only(tmp_path):
    """Work folders in a cache (ORT's quantization and preparation files, an entry of several files)
    are marked before anything goes in: a SIGKILL leaves them marked, and the next Cache removes them;
    a folder without the marker stays, whatever its name."""
    from ptqcal.cache import MARKER

    cache_dir = tmp_path / "cache"
    code = ("import os, signal, sys\n"
            "from pathlib import Path\n"
            "from ptqcal.cache import Cache, scratch_folder\n"
            f"root = Path({str(cache_dir)!r})\n"
            "cache = Cache(root)  # opened once, before the work (a run opens it under its lock)\n"
            "with scratch_folder(root, '.ptqcal-quant-') as tmp:\n"
            "    (tmp / 'model.onnx').write_bytes(b'half')\n"
            "    def killed(folder):\n"
            "        (folder / 'model.onnx').write_text('half')\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    cache.folder('float', 'k', killed)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = sorted(p.name for p in cache_dir.iterdir())
    assert len(left) == 2 and all((cache_dir / name / MARKER).exists() for name in left), left
    lookalike = cache_dir / ".ptqcal-quant-mine"  # named like one, but not marked: not ptqcal's to remove
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine")
    Cache(cache_dir)
    assert sorted(p.name for p in cache_dir.iterdir()) == [".ptqcal-quant-mine"]
    assert (lookalike / "keep.txt").read_text() == "mine"


def test_a_users_file_is_copied_never_linked(tmp_path):
    """``link_or_copy`` links only a file inside the cache it is given; anything else (a user's model)
    is copied: changing the run's copy never changes the user's file."""
    import os

    from ptqcal.cache import link_or_copy

    users = tmp_path / "model.onnx"
    users.write_bytes(b"the user's model" * 1000)
    target = tmp_path / "run" / "model_float.onnx"
    target.parent.mkdir()
    link_or_copy(users, target)
    assert target.read_bytes() == users.read_bytes() and os.stat(users).st_nlink == 1
    assert not os.path.samefile(users, target)
    target.write_bytes(b"changed")
    assert users.read_bytes() == b"the user's model" * 1000
    cache = Cache(tmp_path / "run" / "cache")
    entry = cache.file("x", "k", "bin", lambda tmp: tmp.write_bytes(b"entry"))
    link_or_copy(users, tmp_path / "run" / "again.onnx", within=cache.root)  # not inside the cache: copied
    assert os.stat(users).st_nlink == 1
    link_or_copy(entry, tmp_path / "run" / "entry.bin", within=cache.root)  # the cache's own: may be linked
    assert (tmp_path / "run" / "entry.bin").read_bytes() == b"entry"
