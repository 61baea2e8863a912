"""The quantization run: calibration data, module conversion, calibration, mixed precision, sensitivity, placement.

Imports only go down: relevance / allocation, models / nn, kernels / math. Nothing here imports the integration
floor (transformers' quantizer hooks, saving, the Hub).
"""

from .run import QuantizationResult, quantize

__all__ = ["QuantizationResult", "quantize"]
