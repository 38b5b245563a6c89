"""Bridges to other libraries. ``mileloss.integrations.hf``: Hugging Face ``transformers`` models;
``mileloss.integrations.trainer``: ``MiLeTrainer`` (imported on first use, so that this package needs no
``transformers`` until then)."""

from mileloss.integrations.hf import (
    FAMILIES,
    REFUSED,
    apply_mileloss,
    make_compute_loss_func,
    patch_causal_lm,
    register_transformers_loss,
    transformers_loss_function,
    unpatch_causal_lm,
)

__all__ = ["FAMILIES", "REFUSED", "MiLeTrainer", "apply_mileloss", "make_compute_loss_func", "patch_causal_lm",
           "register_transformers_loss", "transformers_loss_function", "unpatch_causal_lm"]


def __getattr__(name: str):
    if name == "MiLeTrainer":
        from mileloss.integrations.trainer import MiLeTrainer

        return MiLeTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
