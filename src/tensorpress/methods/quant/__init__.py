"""Weight quantization methods (importing registers them)."""

from tensorpress.methods.quant.awq import AWQ
from tensorpress.methods.quant.codebook import NF4, KMeans
from tensorpress.methods.quant.gptq import GPTQ
from tensorpress.methods.quant.rtn import RTN, QuantSettings
from tensorpress.methods.quant.spqr import SpQR

__all__ = ["AWQ", "GPTQ", "NF4", "RTN", "KMeans", "QuantSettings", "SpQR"]
