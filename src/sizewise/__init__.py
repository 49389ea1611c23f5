"""sizewise: compress a causal LM to the size you choose, and measure what it cost."""

__version__ = "0.1.0"

from .api import CalibConfig, CompressConfig, Recipe, Result, compress, evaluate, info, run  # noqa: E402
from .errors import SizewiseError  # noqa: E402
from .plan import Plan  # noqa: E402
from .quant.formats import FloatFormat  # noqa: E402
from .quant.uniform import QuantFormat  # noqa: E402

__all__ = ["compress", "run", "evaluate", "info", "Recipe", "CompressConfig", "CalibConfig", "Result", "Plan",
           "QuantFormat", "FloatFormat", "SizewiseError", "__version__"]
