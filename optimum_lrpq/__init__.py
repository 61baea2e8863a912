"""optimum-lrpq: LRP-guided mixed-precision post-training quantization for vision transformers."""

__version__ = "0.1.0"
