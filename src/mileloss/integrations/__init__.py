"""Bridges to other libraries. ``mileloss.integrations.hf``: Hugging Face ``transformers``."""

from mileloss.integrations.hf import make_compute_loss_func, patch_causal_lm, unpatch_causal_lm

__all__ = ["make_compute_loss_func", "patch_causal_lm", "unpatch_causal_lm"]
