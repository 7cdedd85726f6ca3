"""Weight quantization methods (importing registers them)."""

from tensorpress.methods.quant.gptq import GPTQ
from tensorpress.methods.quant.rtn import RTN, QuantSettings

__all__ = ["GPTQ", "RTN", "QuantSettings"]
