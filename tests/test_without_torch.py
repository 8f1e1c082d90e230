"""The ONNX side works on a machine without torch."""

import subprocess
import sys
import textwrap

import pytest

from conftest import tiny_onnx_classifier

BLOCK_TORCH = textwrap.dedent("""
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, BlockTorch())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_quantize_evaluate_analysis_run_on_onnx_with_torch_blocked(tmp_path):
    tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    completed = _run(f"""
        import numpy as np
        from pathlib import Path
        import ptqcal.quantize as q, ptqcal.evaluate as e, ptqcal.analysis as a
        work = Path({str(tmp_path)!r})
        x = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32)
        prepared = q.prepare(work / "tiny.onnx", work / "prepared.onnx")
        ranges = q.compute_ranges(q.collect_histograms(prepared, q.ArrayDataReader("input", x, 16),
                                                       progress=False), "mse")
        quantized = q.quantize_qdq(prepared, work / "a8w8.onnx", ranges, q.QuantSpec(8))
        f = e.predict(e.make_session(work / "tiny.onnx"), x, progress=False)
        r = e.evaluate_logits("a8w8", e.predict(e.make_session(quantized), x, progress=False),
                              f.argmax(1), f)
        a.save_figure(a.plot_swap_panels([a.SwapPanel.from_results("tiny", [r])]), work / "f.png")
        assert "torch" not in sys.modules
        print("ok", r.change.swap_rate)
    """)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("ok")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_cli_runs_a_user_onnx_model_with_torch_blocked(tmp_path):
    pytest.importorskip("sklearn")
    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    out = tmp_path / "run"
    completed = _run(f"""
        from ptqcal.cli import main
        code = main(["run", "--model", {str(model)!r}, "--out", {str(out)!r}, "--no-progress",
                     "--dataset", "digits", "--preprocess", "digits", "--calib-size", "64"])
        assert "torch" not in sys.modules
        sys.exit(code)
    """)
    assert completed.returncode == 0, completed.stderr
    assert (out / "report.md").exists() and (out / "fig2_swaps.png").exists()


def test_every_module_of_quantize_evaluate_and_analysis_imports_with_torch_blocked():
    completed = _run("""
        import importlib, pkgutil
        import ptqcal.quantize, ptqcal.evaluate, ptqcal.analysis
        names = [f"{package.__name__}.{info.name}" for package in (ptqcal.quantize, ptqcal.evaluate, ptqcal.analysis)
                 for info in pkgutil.iter_modules(package.__path__)]
        for name in names:
            importlib.import_module(name)
        assert "torch" not in sys.modules
        print(len(names))
    """)
    assert completed.returncode == 0, completed.stderr
    assert int(completed.stdout) >= 14  # every module was found and imported
