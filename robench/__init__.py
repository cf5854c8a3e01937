"""robench: adversarial-robustness evaluation for PyTorch."""

from robench._version import __version__
from robench.api import EvaluationResult, evaluate
from robench.attacks.registry import register_attack
from robench.config import EvalConfig
from robench.models import load_model
from robench.pixels import pixel_index
from robench.pixels.folder import pixel_index_folder
from robench.reid.api import evaluate_reid
from robench.runner import run_evaluation
from robench.suites import load_suite

__all__ = ["EvalConfig", "EvaluationResult", "__version__", "evaluate", "evaluate_reid", "load_model", "load_suite",
           "pixel_index", "pixel_index_folder", "register_attack", "run_evaluation"]
