"""hf_to: the Trainable Optimizer (Wang & Klabjan, arXiv:2508.01764) for PyTorch and Hugging Face."""

from .config import StepConfig
from .forms import FORMS, Form, register_form
from .functional import trainable_to
from .optimizer import TrainableOptimizer
from .reference import ReferenceTrainableOptimizer
from .registry import VARIANTS, create_optimizer, load_optimizer

#: The estimator forms by name (``estimator=``); see :mod:`hf_to.forms`.
ESTIMATORS = FORMS

__all__ = [
    "ESTIMATORS",
    "FORMS",
    "VARIANTS",
    "Form",
    "ReferenceTrainableOptimizer",
    "StepConfig",
    "TrainableOptimizer",
    "create_optimizer",
    "load_optimizer",
    "register_form",
    "trainable_to",
]
__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Register ``--optim trainable_to`` now if transformers is loaded, else when it loads.

    Never imports transformers: the start-up hook's finder (``_hf_to_startup``) runs the
    registration right after ``transformers.training_args`` / ``trainer_optimizer`` /
    ``trainer`` execute.  ``import hf_to`` arms it even when ``HF_TO_DISABLE_HOOK`` is set.
    """
    import sys

    try:
        import _hf_to_startup
    except ImportError:  # hf_to vendored without its start-up module: register what is loaded
        if "transformers.training_args" in sys.modules:
            from .integrations.transformers import register

            register()
        return
    _hf_to_startup.arm(force=True)


_register_with_transformers()
