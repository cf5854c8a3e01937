"""robench: adversarial-robustness evaluation for PyTorch."""

__version__ = "0.1.0"

from robench.api import EvaluationResult, evaluate  # noqa: E402
from robench.models import load_model  # noqa: E402
from robench.pixels import pixel_index  # noqa: E402  (also registers attack: pixels)
from robench.reid import generator as _dmr_generator  # noqa: E402,F401  (registers attack: dmr)
from robench.suites import load_suite  # noqa: E402

__all__ = ["EvaluationResult", "__version__", "evaluate", "load_model", "load_suite", "pixel_index"]
