"""optimum-lrpq: LRP-guided mixed-precision post-training quantization (LRP-QViT) for vision transformers.

Importing the package registers the `lrpq` quantization method (config and quantizer) and the `lrpq` attention
function with transformers, so quantized checkpoints load with `AutoModelForImageClassification.from_pretrained`.
"""

from .configuration import LRPQConfig
from .integration.quantizer import LRPQuantizer
from .integration.registration import register
from .models import supported_models
from .nn import set_kernel_backend
from .version import __version__

register()

__all__ = ["LRPQConfig", "LRPQuantizer", "__version__", "set_kernel_backend", "supported_models"]
