"""Lossless coding of weights: entropy-coded floats (DFloat11-style) and quantization codes.

```python
blob = tp.lossless.encode(tensor)      # bytes; dtype and shape travel inside
same = tp.lossless.decode(blob)        # bit-identical tensor, or CodingError
```
"""

from tensorpress.lossless.format import CodingStats, decode, encode, encode_with_stats

__all__ = ["CodingStats", "decode", "encode", "encode_with_stats"]
