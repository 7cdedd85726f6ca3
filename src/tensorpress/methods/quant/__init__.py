"""Weight quantization methods."""

from tensorpress.methods.quant.rtn import RTN, QuantSettings

__all__ = ["RTN", "QuantSettings"]
