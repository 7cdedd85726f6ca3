"""Low-rank decomposition and low-rank error compensation (importing registers them)."""

from tensorpress.methods.lowrank.compensate import QLR, EoRA
from tensorpress.methods.lowrank.svd import ASVD, SVD, SVDLLM, LowRankSettings

__all__ = ["ASVD", "QLR", "SVD", "SVDLLM", "EoRA", "LowRankSettings"]
