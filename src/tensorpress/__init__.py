"""tensorpress: compress trained transformer models and measure the result honestly.

```python
import tensorpress as tp
lm = tp.load_model("smollm2-135m")
calib = tp.data.calibration(lm, source="generated", samples=64, seq_len=256, seed=0)
result = tp.compress(lm, tp.recipes.get("rtn-w4g128"), calib)
report = tp.evaluate(result, reference=lm)
result.save("out/w4")
```
"""

__version__ = "0.1.0"

from tensorpress import data, errors, kv, lossless  # noqa: E402
from tensorpress import recipe as recipes  # noqa: E402  (tp.recipes.get / builtin_names)
from tensorpress.engine import CompressionResult  # noqa: E402
from tensorpress.eval import EvalReport, evaluate  # noqa: E402
from tensorpress.io import load_checkpoint as load_compressed  # noqa: E402
from tensorpress.models import LoadedModel, load_model  # noqa: E402
from tensorpress.recipe import Recipe  # noqa: E402
from tensorpress.search.allocate import compress  # noqa: E402  (the engine with the allocation layer)

__all__ = [
    "CompressionResult",
    "EvalReport",
    "LoadedModel",
    "Recipe",
    "__version__",
    "compress",
    "data",
    "errors",
    "evaluate",
    "kv",
    "load_compressed",
    "load_model",
    "lossless",
    "recipes",
]
