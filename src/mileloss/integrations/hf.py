"""MiLe, focal or CE loss for Hugging Face ``transformers`` causal LMs.

Two ways in, in rising order of savings:

>>> trainer = Trainer(model=model, args=args, train_dataset=data,
...                   compute_loss_func=make_compute_loss_func("mile", gamma=1.0, sigma=1.0))   # doctest: +SKIP
>>> patch_causal_lm(model, loss="mile")      # model(input_ids, labels=labels).loss is now MiLe   # doctest: +SKIP

``make_compute_loss_func`` computes the loss from the model's logits. ``patch_causal_lm`` replaces the model's
``forward`` so that, when ``labels`` are given, the loss is computed from the last hidden states with the fused
LM-head loss: in training mode the (tokens, vocab) logits are never built (``outputs.logits`` is ``None``).

Labels follow the Hugging Face convention: ``labels`` are the input ids (``-100`` where ignored); they are padded
with ``-100`` on the right and shifted left by one, so position t predicts token t + 1.

``num_items_in_batch`` (what ``Trainer`` passes under gradient accumulation) is the number of target tokens of
the whole accumulated batch. The returned loss is then the local weighted mean times ``local tokens /
num_items_in_batch``: exact for CE (the sum divided by the global count, as Hugging Face does) and, for focal and
MiLe, the token-count-weighted average of the micro-batches' weighted means (the exact global weighted mean needs
the global weight sum: use ``mileloss.losses.WeightNormalizer`` in a custom loop, as ``mileloss train`` does).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from mileloss.losses import linear_token_weighted_loss, token_weighted_loss

__all__ = [
    "causal_lm_loss", "make_compute_loss_func", "patch_causal_lm", "shift_labels", "unpatch", "unpatch_causal_lm",
]

_KINDS = ("ce", "focal", "mile")


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets: pad with ``ignore_index`` on the right, then drop the first column."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def _scale_to_batch(loss: torch.Tensor, stats, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss * (stats.valid_count.to(loss.dtype) / num_items_in_batch)


def _check_kind(loss: str) -> None:
    if loss not in _KINDS:
        raise ValueError(f"loss must be one of {_KINDS}, got {loss!r}")


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    shifted_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-weighted loss of a causal LM from its logits, with Hugging Face label shifting.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) unshifted labels (usually the input ids, ``ignore_index`` where ignored).
        loss: "ce", "focal" or "mile".
        num_items_in_batch: target-token count of the whole accumulated batch (see the module docstring).
        shifted_labels: already shifted targets (B, T) to use instead of shifting ``labels``.
    Returns:
        0-d loss.
    """
    _check_kind(loss)
    targets = shift_labels(labels, ignore_index) if shifted_labels is None else shifted_labels
    value, stats = token_weighted_loss(
        logits.float(), targets.to(logits.device), weighting=loss, gamma=gamma, sigma=sigma,
        ignore_index=ignore_index, return_stats=True,
    )
    return _scale_to_batch(value, stats, num_items_in_batch)


def make_compute_loss_func(loss: str = "mile", *, gamma: float = 1.0, sigma: float = 1.0, ignore_index: int = -100):
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for ``transformers.Trainer``.

    >>> trainer = Trainer(..., compute_loss_func=make_compute_loss_func("mile"))   # doctest: +SKIP
    """
    _check_kind(loss)

    def compute_loss_func(outputs: Any, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        return causal_lm_loss(logits, labels, loss=loss, gamma=gamma, sigma=sigma, ignore_index=ignore_index,
                              num_items_in_batch=num_items_in_batch)

    compute_loss_func.__name__ = f"{loss}_compute_loss_func"
    return compute_loss_func


def _fused_forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
    """Replacement ``forward``: the body, then the fused loss on the last hidden states when labels are given."""
    if labels is None:
        return self._mileloss_original_forward(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kwargs
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    options = self._mileloss_options
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    targets = kwargs.pop("shift_labels", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs[0]  # (B, T, D) last hidden states
    if targets is None:
        targets = shift_labels(labels, options["ignore_index"])
    head = self.lm_head
    weight = head.weight if head.weight.dtype == hidden.dtype else head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, stats = linear_token_weighted_loss(
            hidden, weight, targets.to(hidden.device), bias, weighting=options["loss"], gamma=options["gamma"],
            sigma=options["sigma"], ignore_index=options["ignore_index"], chunk_size=options["chunk_size"],
            return_stats=True,
        )
    loss = _scale_to_batch(loss, stats, num_items_in_batch)
    return_logits = options["return_logits"]
    if return_logits is None:
        return_logits = not self.training
    logits = head(hidden) if return_logits else None
    # the cache field is `cache` in recent transformers, `past_key_values` before
    known = CausalLMOutputWithPast.__dataclass_fields__
    extra = {name: getattr(outputs, name, None) for name in ("cache", "past_key_values", "hidden_states", "attentions")
             if name in known}
    return CausalLMOutputWithPast(loss=loss, logits=logits, **extra)


def patch_causal_lm(
    model: torch.nn.Module,
    loss: str = "mile",
    *,
    gamma: float = 1.0,
    sigma: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_logits: bool | None = None,
) -> torch.nn.Module:
    """Make a ``*ForCausalLM`` compute its training loss with the fused linear loss (in place; returns the model).

    Works for models with a ``.model`` body returning ``last_hidden_state`` and an ``nn.Linear`` ``.lm_head``
    (LLaMA, Mistral, Qwen2, ...). Calls without ``labels`` run the original forward unchanged.

    Args:
        model: e.g. a ``transformers.LlamaForCausalLM``.
        loss: "ce", "focal" or "mile".
        gamma, sigma: the token-weight parameters.
        return_logits: also compute ``outputs.logits`` when labels are given; ``None`` (default) does so only in
            eval mode, so training never builds the (tokens, vocab) logits.
    Raises:
        ValueError: the model has no ``.model``/``.lm_head``, or scales/caps its logits (which the fused loss
            would not reproduce).
    """
    _check_kind(loss)
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear) or not hasattr(model, "model"):
        raise ValueError(f"{type(model).__name__} has no `.model` body and `nn.Linear` `.lm_head` to fuse")
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} uses config.{attribute}; the fused loss would ignore it")
    if not hasattr(model, "_mileloss_original_forward"):
        model._mileloss_original_forward = model.forward
    model._mileloss_options = {"loss": loss, "gamma": gamma, "sigma": sigma, "ignore_index": ignore_index,
                               "chunk_size": chunk_size, "return_logits": return_logits}
    model.forward = types.MethodType(_fused_forward, model)
    return model


def unpatch_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_causal_lm` (no-op on an unpatched model)."""
    if hasattr(model, "_mileloss_original_forward"):
        del model.forward  # the instance attribute; the class's forward shows through again
        del model._mileloss_original_forward
        del model._mileloss_options
    return model


unpatch = unpatch_causal_lm
