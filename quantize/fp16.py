"""Half precision as one more point of the sweep."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxconverter_common import float16


def convert_fp16(float_path: str | Path, out_path: str | Path) -> Path:
    """onnxconverter-common's float16 conversion, keeping float32 inputs and outputs."""
    model = float16.convert_float_to_float16(onnx.load(str(float_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return Path(out_path)
