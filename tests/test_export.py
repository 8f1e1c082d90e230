import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from ptqcal.export import check_graph, export_onnx  # noqa: E402


def test_batchnorm_is_folded_and_logits_match_pytorch(digits_onnx, digits_model, digits_inputs):
    model = onnx.load(str(digits_onnx))
    ops = {node.op_type for node in model.graph.node}
    assert "BatchNormalization" not in ops and "Softmax" not in ops
    assert "Conv" in ops
    _, eval_inputs = digits_inputs
    with torch.no_grad():
        expected = digits_model(torch.from_numpy(eval_inputs)).numpy()
    session = ort.InferenceSession(str(digits_onnx), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"input": eval_inputs})[0]  # all 1,197 real images, dynamic batch
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) < 1e-4


def test_export_reports_the_difference_it_measured(digits_model, digits_inputs, tmp_path):
    result = export_onnx(digits_model, digits_inputs[1][:32], tmp_path / "m.onnx")
    assert result.num_checked == 32 and 0 <= result.max_abs_diff < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_folded_weights_are_bit_for_bit_torchs_own_folding(tmp_path):
    """torch.ao quantizes weights folded by fuse_conv_bn_eval: the ONNX graph must start from the same bits."""
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.1, 3), norm.weight.uniform_(0.5, 2)
    model = torch.nn.Sequential(torch.nn.Sequential(conv, norm), torch.nn.ReLU()).eval()
    export_onnx(model, np.ones((2, 3, 8, 8), np.float32), tmp_path / "m.onnx")
    expected = torch.nn.utils.fuse_conv_bn_eval(conv, norm)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    node = next(n for n in graph.node if n.op_type == "Conv")
    assert node.name == "/0/0.0/Conv"  # the module path survives the folding (--exclude names it)
    weight, bias = (initializers[name] for name in node.input[1:])
    np.testing.assert_array_equal(weight, expected.weight.detach().numpy())
    np.testing.assert_array_equal(bias, expected.bias.detach().numpy())


def test_unfoldable_batchnorm_and_softmax_are_rejected(tmp_path):
    norm_after_relu = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="BatchNorm"):
        export_onnx(norm_after_relu.eval(), np.ones((2, 4), np.float32), tmp_path / "bn.onnx")
    assert not (tmp_path / "bn.onnx").exists()
    softmax = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="Softmax"):
        export_onnx(softmax.eval(), np.ones((2, 4), np.float32), tmp_path / "sm.onnx")
    assert not list(tmp_path.iterdir())
    graph = onnx.helper.make_graph([onnx.helper.make_node("Softmax", ["x"], ["logits"])], "g", [], [])
    with pytest.raises(ValueError, match="Softmax"):
        check_graph(onnx.helper.make_model(graph))


@pytest.mark.slow
def test_a_registry_models_run_never_loads_torch_into_the_runs_process(tmp_path):
    """The export runs in a child process: the run's own process, which then streams every image
    through ONNX Runtime, never holds PyTorch (about 0.6 GB resident)."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    code = ("import sys; from ptqcal.cli import main; "
            f"code = main(['run', '--model', 'digits_resnet8', '--weight-bits', '8', '--no-timing', '--no-progress', "
            f"'--quiet', '--out', {str(tmp_path / 'run')!r}, '--cache-dir', {str(tmp_path / 'models')!r}]); "
            "assert code == 0, code; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "model_float.onnx").is_file()
