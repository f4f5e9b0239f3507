"""Weight quantization: formats (plain-torch reference math), methods (one per format, behind
the QuantMethod interface) and the modules that hold quantized weights."""

from inference_pio.layers.quantization.config import (
    PIO_QUANT_METHOD,
    QUANTIZATIONS,
    QuantConfig,
    QuantizationError,
    parse_quantization,
)
from inference_pio.layers.quantization.methods import QuantMethod
from inference_pio.layers.quantization.modules import (
    CompactEmbedding,
    QuantExperts,
    QuantLinear,
    quantize_modules,
)

__all__ = [
    "PIO_QUANT_METHOD", "QUANTIZATIONS", "CompactEmbedding", "QuantConfig", "QuantExperts",
    "QuantLinear", "QuantMethod", "QuantizationError", "parse_quantization", "quantize_modules",
]
