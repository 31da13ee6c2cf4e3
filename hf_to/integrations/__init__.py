"""Integrations of the Trainable Optimizer with training frameworks.

:mod:`hf_to.integrations.transformers` registers ``--optim trainable_to`` with the Hugging Face
``Trainer``; it is imported on demand (by ``import hf_to`` once transformers is loaded, or by
the start-up hook), never eagerly here, so that ``import hf_to`` does not import transformers.
"""

__all__: list[str] = []
