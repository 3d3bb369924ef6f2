"""Calibrated quantizers: GPTQ (gptq.py), activation-aware scaling (awq.py), and the
layer-by-layer calibration that runs them (calibration.py). fourbit.quantize_ and
fourbit.load_model call them for Int4WeightOnlyConfig(method="gptq" | "awq")."""

from .calibration import calibration_ids, default_calibration_text, quantize_calibrated
from .gptq import Hessian, gptq_quantize, rtn_quantize

__all__ = ["Hessian", "calibration_ids", "default_calibration_text", "gptq_quantize", "quantize_calibrated",
           "rtn_quantize"]
