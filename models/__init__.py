"""Classifiers by name with their preprocessing, and user-supplied ONNX files.

Importing this package does not import torch; builders import it when called.
"""

from .onnx_model import (OnnxModelInfo, PreprocessOverrides, check_onnx_file, inspect_onnx, onnx_preprocess,
                         without_softmax)
from .preprocess import PreprocessCfg
from .registry import ModelEntry, get_model_entry, list_models, register
from .weights import RANDOM_WEIGHTS, ModelError, load_state_dict_strict

__all__ = ["RANDOM_WEIGHTS", "ModelEntry", "ModelError", "OnnxModelInfo", "PreprocessCfg", "PreprocessOverrides",
           "check_onnx_file", "get_model_entry", "inspect_onnx", "list_models", "load_state_dict_strict", "onnx_preprocess", "register",
           "without_softmax"]
