"""The sequential block-by-block runner and statistics collection."""

from tensorpress.engine.result import CompressionResult, LayerReport
from tensorpress.engine.sequential import compress

__all__ = ["CompressionResult", "LayerReport", "compress"]
