"""ptqcal: what post-training quantization does to a classifier's predictions and calibration."""

__version__ = "0.2.0"
