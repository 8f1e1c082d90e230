"""Classifiers by name with their preprocessing, and user-supplied ONNX files.

Importing this package does not import torch; builders import it when called.
"""

from .onnx_model import OnnxModelInfo, inspect_onnx, without_softmax
from .preprocess import PreprocessCfg
from .registry import ModelEntry, get_model_entry, list_models, load_state_dict_strict, register

__all__ = ["ModelEntry", "OnnxModelInfo", "PreprocessCfg", "get_model_entry", "inspect_onnx",
           "list_models", "load_state_dict_strict", "register", "without_softmax"]
