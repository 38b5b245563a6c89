"""MiLe, focal or CE loss for Hugging Face ``transformers`` causal LMs.

Three ways in, in rising order of savings and exactness:

>>> trainer = Trainer(model=model, args=args, train_dataset=data,
...                   compute_loss_func=make_compute_loss_func("mile", gamma=1.0, sigma=1.0))   # doctest: +SKIP
>>> apply_mileloss(model, loss="mile")      # model(input_ids, labels=labels).loss is now MiLe   # doctest: +SKIP
>>> trainer = MiLeTrainer(model=apply_mileloss(model, "mile"), args=args, train_dataset=data)  # doctest: +SKIP

``make_compute_loss_func`` computes the loss from the model's logits. ``apply_mileloss`` (alias
``patch_causal_lm``) replaces the model's ``forward`` so that, when ``labels`` are given, the loss is computed from
the last hidden states with the fused LM-head loss: in training mode the (tokens, vocab) logits are never built
(``outputs.logits`` is ``None``). ``mileloss.integrations.MiLeTrainer`` (``integrations/trainer.py``) adds the
exact normalisation under gradient accumulation.

Labels follow the Hugging Face convention: ``labels`` are the input ids (``-100`` where ignored); they are padded
with ``-100`` on the right and shifted left by one, so position t predicts token t + 1.

``num_items_in_batch`` (what ``Trainer`` passes under gradient accumulation) is the number of target tokens of
the whole accumulated batch. The returned loss is then the local weighted mean times ``local tokens /
num_items_in_batch``: exact for CE (the sum divided by the global count, as Hugging Face does) and, for focal and
MiLe, the token-count-weighted average of the micro-batches' weighted means. The exact global weighted mean needs
the global weight sum: ``MiLeTrainer`` (or ``mileloss.losses.WeightNormalizer`` in a custom loop, as
``mileloss train`` does).
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F

from mileloss.errors import ParameterError, TrainerSetupError, UnsupportedModelError
from mileloss.losses import linear_token_weighted_loss, token_weighted_loss

__all__ = [
    "FAMILIES", "REFUSED", "apply_mileloss", "causal_lm_loss", "make_compute_loss_func", "patch_causal_lm",
    "register_transformers_loss", "shift_labels", "transformers_loss_function", "unpatch", "unpatch_causal_lm",
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
        raise ParameterError(f"loss must be one of {_KINDS}, got {loss!r}")


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


# verified families: the ``*ForCausalLM`` class name -> (what the README calls it, router auxiliary loss?)
FAMILIES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("Llama", False),
    "MistralForCausalLM": ("Mistral", False),
    "Qwen2ForCausalLM": ("Qwen2", False),
    "Qwen3ForCausalLM": ("Qwen3", False),
    "Phi3ForCausalLM": ("Phi-3", False),
    "Olmo2ForCausalLM": ("OLMo 2", False),
    "GPTNeoXForCausalLM": ("GPT-NeoX", False),
    "MixtralForCausalLM": ("Mixtral", True),
    "Qwen2MoeForCausalLM": ("Qwen2-MoE", True),
    "Gemma2ForCausalLM": ("Gemma 2", False),  # final-logit softcap: the engine's softcap option
    "Gemma3ForCausalLM": ("Gemma 3", False),
}
# families whose head output config.final_logit_softcapping caps: s * tanh(z / s), as the engine's softcap does
SOFTCAPPED = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
ENGINE_HAS_SOFTCAP = "softcap" in inspect.signature(linear_token_weighted_loss).parameters
# families whose forward transforms the logits after the head in a way the engine cannot reproduce
REFUSED: dict[str, str] = {} if ENGINE_HAS_SOFTCAP else {
    name: "a final-logit softcap (config.final_logit_softcapping): this mileloss's loss engine has no `softcap` option"
    for name in SOFTCAPPED
}
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _family(model: torch.nn.Module) -> tuple[str | None, type | None]:
    """The first class of the model's MRO that is a verified or refused family (subclasses inherit it)."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES or cls.__name__ in REFUSED:
            return cls.__name__, cls
    return None, None


def _check_model(model: torch.nn.Module) -> tuple[str, torch.nn.Module | None]:
    """(family class name, the module defining it) or UnsupportedModelError naming what is missing."""
    kind = type(model).__name__  # PEFT adapters in the body are fine; on the head, the check below refuses them
    name, cls = _family(model)
    if name in REFUSED:
        softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        raise UnsupportedModelError(f"{kind} ({name}) applies {REFUSED[name]} (this model's value: {softcap!r}); "
                                    "train it with make_compute_loss_func, or the plain model")
    missing = []
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or not isinstance(getattr(model, prefix, None), torch.nn.Module):
        missing.append(f"a body module at `.{prefix or 'base_model_prefix'}` (the model's base_model_prefix)")
    get_head = getattr(model, "get_output_embeddings", None)
    head = _innermost(get_head()) if callable(get_head) and get_head() is not None else None
    if type(head) is not torch.nn.Linear and not (isinstance(head, torch.nn.Linear) and type(head).forward is
                                                  torch.nn.Linear.forward):
        missing.append(f"an nn.Linear output embedding from get_output_embeddings() (got "
                       f"{type(head).__module__}.{type(head).__qualname__}; a PEFT adapter or modules_to_save on the "
                       "head is not fused: leave lm_head out of target_modules)")
    config = getattr(model, "config", None)
    for attribute in _LOGIT_TRANSFORMS:
        if attribute == "final_logit_softcapping" and name in SOFTCAPPED:
            continue  # the engine's softcap reproduces it
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            missing.append(f"support for config.{attribute} = {getattr(config, attribute)!r}, which transforms the "
                           "logits after the head")
    if name is None:
        verified = ", ".join(label for label, _ in FAMILIES.values())
        missing.append(f"a verified family: its class ({kind}) derives from none of {', '.join(FAMILIES)} "
                       f"({verified}), so its forward may do more than head + cross-entropy")
    if missing:
        raise UnsupportedModelError(f"apply_mileloss cannot fuse {kind}: missing " + "; ".join(missing))
    return name, inspect.getmodule(cls)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run ``nn.Linear`` in on this device, or None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _whole_weight_problem(weight: torch.Tensor, hidden: torch.Tensor) -> str | None:
    """Why ``weight`` is not the whole (vocab, D) head matrix right now, or None when it is.

    Sharded heads look like this outside the code that gathers them: FSDP2 and tensor parallelism give a
    ``DTensor`` (it has a ``device_mesh``); DeepSpeed ZeRO-3 a partitioned parameter carrying ``ds_id`` and
    ``ds_status`` (``NOT_AVAILABLE`` until its module's forward pre-hook fetches it; the data is then a 0-size or
    partial tensor, the full shape is ``ds_shape``); FSDP1 without ``use_orig_params`` a flattened view."""
    if type(weight).__name__ == "DTensor" or hasattr(weight, "device_mesh"):
        return f"a DTensor (FSDP2 / tensor parallel, placements {getattr(weight, 'placements', '?')})"
    if hasattr(weight, "ds_id"):
        status = getattr(weight, "ds_status", None)
        status = getattr(status, "name", status)
        full = tuple(getattr(weight, "ds_shape", ()) or ())
        if status != "AVAILABLE" or (full and tuple(weight.shape) != full):
            return (f"a DeepSpeed ZeRO-3 partition (ds_status {status}, data {tuple(weight.shape)}, ds_shape "
                    f"{full or '?'})")
    if weight.dim() != 2 or weight.shape[-1] != hidden.shape[-1]:
        return f"of shape {tuple(weight.shape)}, not (vocab, {hidden.shape[-1]}) (a flattened or sharded parameter)"
    try:  # tensor subclasses without a plain storage (quantised weights, ...) skip this check
        held = None if weight.device.type == "meta" else weight.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        held = None
    needed = (weight.storage_offset() + weight.numel()) * weight.element_size()
    if held is not None and held < needed:  # FSDP1 (use_orig_params=False) between its forwards
        return (f"a view of shape {tuple(weight.shape)} whose storage holds {held} of its {needed} bytes (a "
                "resharded FSDP1 flat parameter)")
    return None


def _innermost(head: torch.nn.Module) -> torch.nn.Module:
    """The module inside FSDP1 / activation-checkpoint wrappers (whose own forward calls the wrapped one)."""
    for attribute in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"):
        while isinstance(getattr(head, attribute, None), torch.nn.Module):
            head = getattr(head, attribute)
    return head


def _inside_head_call(model: torch.nn.Module, head: torch.nn.Module, hidden: torch.Tensor, problem: str, compute):
    """Run ``compute(hidden, linear)`` as the head module's forward, so that what gathers a sharded head for its
    forward runs around it: FSDP2's pre-forward unshard (and its backward hooks, which reduce-scatter the
    gradient), DeepSpeed ZeRO-3's pre-forward fetch, FSDP1's unshard. If the weight is still not whole inside
    (tensor parallelism, a gather that did not happen), refuse rather than fuse on a shard.

    Returns what ``compute`` returned: (loss, stats); the loss is the value the head's call returns, so the
    backward hooks those wrappers attach to the module's outputs fire."""
    linear = _innermost(head)
    captured = {}

    def forward(hidden_inside):
        inner_problem = _whole_weight_problem(linear.weight, hidden_inside)
        if inner_problem is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s head weight is {problem} at forward and still {inner_problem} inside "
                "the head module's own forward, so nothing gathers it: apply_mileloss fuses a head that FSDP "
                "(fully_shard / FullyShardedDataParallel) or DeepSpeed ZeRO-3 gathers for its forward, not a "
                "tensor-parallel head; keep lm_head replicated or unpatch the model")
        loss, stats = compute(hidden_inside, linear)
        captured["stats"] = stats
        return loss

    had_own = "forward" in vars(linear)
    own = vars(linear).get("forward")
    linear.forward = forward
    try:
        loss = head(hidden)
    finally:
        if had_own:
            linear.forward = own
        else:
            del linear.forward
    return loss.float() if loss.dtype != torch.float64 else loss, captured["stats"]


def _head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head runs in: inside ``torch.autocast``, the autocast dtype (what HF's ``nn.Linear`` head
    would use); outside, the wider of the hidden states' and the weight's dtypes, so that an fp32 head on a bf16
    body is never computed in bf16 (HF's own ``nn.Linear`` would refuse the mix)."""
    return _autocast_dtype(hidden.device.type) or torch.promote_types(hidden.dtype, weight.dtype)


def _keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions whose logits the caller asked for, as Hugging Face's ``logits_to_keep`` selects them."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` inside a ``peft.PeftModel`` (adapters injected into its layers), else the model."""
    if not callable(getattr(model, "get_base_model", None)):
        return model
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} uses prompt learning ({config.peft_type}), which rewrites the inputs and "
            "labels around the model: apply_mileloss fuses adapter methods (LoRA, ...) only")
    return model.get_base_model()


def transformers_loss_function(loss: str = "mile", *, gamma: float = 1.0, sigma: float = 1.0):
    """A loss with the signature of transformers' ``ForCausalLMLoss``: ``(logits, labels, vocab_size,
    num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs)``, for ``model.loss_function = ...``
    or :func:`register_transformers_loss`. It works on the model's logits (not fused: see ``apply_mileloss``)."""
    _check_kind(loss)

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        if labels is None and shift_labels is None:
            raise ParameterError("the loss needs labels or shift_labels")
        if shift_labels is not None:
            shift_labels = shift_labels.reshape(logits.shape[:-1])
        return causal_lm_loss(logits, labels, loss=loss, gamma=gamma, sigma=sigma, ignore_index=ignore_index,
                              num_items_in_batch=num_items_in_batch, shifted_labels=shift_labels)

    loss_function.__name__ = f"{loss}_ForCausalLMLoss"
    return loss_function


def register_transformers_loss(loss: str = "mile", *, gamma: float = 1.0, sigma: float = 1.0,
                               name: str | None = None) -> str:
    """Add :func:`transformers_loss_function` to ``transformers.loss.loss_utils.LOSS_MAPPING``; returns its key.

    >>> model.loss_type = register_transformers_loss("mile", gamma=1.0, sigma=1.0)   # doctest: +SKIP

    Then ``model.loss_function`` (which a model's forward calls with its logits) is MiLe. The key defaults to
    ``"ForCausalLM_mileloss_<loss>_g<gamma>_s<sigma>"``; registering the same key again replaces it.

    Under ``transformers.Trainer`` prefer ``model.loss_function = transformers_loss_function(...)``: it leaves
    ``model.loss_type`` alone, and transformers 5.x's Trainer counts ``num_items_in_batch`` over the shifted labels
    only when ``loss_type`` maps to its own ``ForCausalLMLoss``; with another key it also counts position 0 of each
    row, which scales the loss by local / (global + rows) (measured: 5.3e-2 relative update error for CE on 4 rows
    of 12 tokens, ``tests/integrations/test_trainer.py``).
    """
    from transformers.loss.loss_utils import LOSS_MAPPING

    key = name or f"ForCausalLM_mileloss_{loss}_g{gamma:g}_s{sigma:g}"
    LOSS_MAPPING[key] = transformers_loss_function(loss, gamma=gamma, sigma=sigma)
    return key


def _fused_forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
    """Replacement ``forward``: the body, then the fused loss on the last hidden states when labels are given."""
    if labels is None:
        return self._mileloss_original_forward(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kwargs
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    options = self._mileloss_options
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    targets = kwargs.pop("shift_labels", None)
    return_dict = kwargs.pop("return_dict", None)
    router_aux = options["router_aux"]
    if router_aux is not None:
        output_router_logits = kwargs.pop("output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        kwargs["output_router_logits"] = output_router_logits
    outputs = getattr(self, self.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs[0]  # (B, T, D) last hidden states
    if targets is None:
        targets = shift_labels(labels, options["ignore_index"])
    head = self.get_output_embeddings()
    # MiLeTrainer collects the exact normaliser: in training it asks for the unnormalised sum (times a fixed scale)
    collector = getattr(self, "_mileloss_collector", None)
    summing = collector is not None and self.training and torch.is_grad_enabled()
    softcap = options["softcap"]

    def compute(hidden, linear):
        dtype = _head_dtype(hidden, linear.weight)
        bias = None if linear.bias is None else linear.bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_token_weighted_loss(
                hidden.to(dtype), linear.weight.to(dtype), targets.to(hidden.device), bias,
                weighting=options["loss"], gamma=options["gamma"], sigma=options["sigma"],
                ignore_index=options["ignore_index"], chunk_size=options["chunk_size"],
                reduction="sum" if summing else "mean", return_stats=True,
                **({} if softcap is None else {"softcap": softcap}),
            )

    problem = _whole_weight_problem(_innermost(head).weight, hidden)
    if problem is None:  # the whole weight is here (unsharded, or FSDP2's root unit during its forward)
        loss, stats = compute(hidden, _innermost(head))
    else:  # sharded: let the head module's own forward hooks gather it
        loss, stats = _inside_head_call(self, head, hidden, problem, compute)
    if not summing and loss.dtype in (torch.float16, torch.bfloat16):
        # the engine returns a mean in the inputs' dtype; HF's loss (logits upcast to fp32) is an fp32 value. The
        # same weighted mean from the float64 sums, with the engine's gradient (the correction is detached)
        exact = torch.where(stats.weight_sum > 0, stats.weighted_ce_sum / stats.weight_sum, loss.double())
        loss = loss.float() + (exact.float() - loss.float()).detach()
    if summing:
        loss = loss * collector(stats, num_items_in_batch)
    else:
        loss = _scale_to_batch(loss, stats, num_items_in_batch)
    aux_loss = None
    if router_aux is not None and kwargs["output_router_logits"]:
        if summing:
            raise TrainerSetupError(
                f"{type(self).__name__} adds its router auxiliary loss (output_router_logits=True); MiLeTrainer's "
                "exact normalisation would rescale it too: set config.output_router_logits = False, or use Trainer")
        aux_loss = router_aux(outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask)
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
    return_logits = options["return_logits"]
    if return_logits is None:
        return_logits = not self.training
    logits = head(_keep(hidden, logits_to_keep)) if return_logits else None
    if logits is not None and softcap is not None:  # as the family's own forward returns them
        logits = torch.tanh(logits / softcap) * softcap
    output_class = CausalLMOutputWithPast if router_aux is None else MoeCausalLMOutputWithPast
    # the cache field is `cache` in recent transformers, `past_key_values` before
    known = output_class.__dataclass_fields__
    extra = {name: getattr(outputs, name, None) for name in ("cache", "past_key_values", "hidden_states", "attentions",
                                                             "router_logits") if name in known}
    if router_aux is not None:
        extra["aux_loss"] = aux_loss
    result = output_class(loss=loss, logits=logits, **extra)
    return result.to_tuple() if return_dict is False else result


def apply_mileloss(
    model: torch.nn.Module,
    loss: str = "mile",
    *,
    gamma: float = 1.0,
    sigma: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_logits: bool | None = None,
) -> torch.nn.Module:
    """Make a Hugging Face ``*ForCausalLM`` compute its training loss with the fused linear loss (in place).

    ``model(input_ids, labels=labels).loss`` becomes the CE, focal or MiLe loss computed chunk by chunk from the
    last hidden states and the head's weight: in training mode the (tokens, vocab) logits are never built
    (``outputs.logits`` is ``None``). Labels are shifted as Hugging Face does (``shift_labels=`` given by the
    caller is used as is), ``ignore_index`` positions are skipped and ``num_items_in_batch`` scales the loss as
    in the module docstring. Calls without ``labels`` run the original forward unchanged.

    Families (``FAMILIES``; subclasses too): Llama, Mistral, Qwen2, Qwen3, Phi-3, OLMo 2, GPT-NeoX, Gemma 2 and 3
    (their final-logit softcap, ``config.final_logit_softcapping``, is the engine's ``softcap`` option; refused
    with an engine without it), and the MoE families Mixtral and Qwen2-MoE, whose router auxiliary loss is added
    as their own forward adds it (``loss + router_aux_loss_coef * aux_loss`` when ``output_router_logits``). Any
    other model is refused with an error that names what is missing. Calling it again replaces the options.

    PEFT: a ``peft.PeftModel`` with adapters in the body (LoRA on attention/MLP, ...) is patched inside (its
    ``*ForCausalLM``); adapters or ``modules_to_save`` on the head, and prompt learning, are refused.

    Precision: inside ``torch.autocast`` the head runs in the autocast dtype, as HF's ``nn.Linear`` head would
    (hidden states and weight cast to it; an fp32 weight still gets an fp32 gradient); outside autocast, in the
    wider of the hidden states' and the weight's dtypes (an fp32 head on a bf16 body runs in fp32). The engine
    accumulates in fp32 either way.

    Sharded heads: when the head weight is not the whole (vocab, D) matrix at forward time (an FSDP2 ``DTensor``
    when ``lm_head`` is its own ``fully_shard`` unit, a DeepSpeed ZeRO-3 partition, an FSDP1 flat shard), the
    fused loss runs as the head module's own forward, so the hooks that gather the weight for that forward (and
    reduce-scatter its gradient) run around it. With ``lm_head`` in FSDP2's root unit the weight is already whole
    during the root's forward. A weight that is still sharded inside (tensor parallelism) is refused.

    Args:
        model: e.g. a ``transformers.LlamaForCausalLM``.
        loss: "ce", "focal" or "mile".
        gamma, sigma: the token-weight parameters.
        chunk_size: tokens per chunk of the fused loss (None: the engine's default).
        return_logits: also compute ``outputs.logits`` when labels are given; ``None`` (default) does so only in
            eval mode, so training never builds the (tokens, vocab) logits.
    Returns:
        The same model.
    Raises:
        UnsupportedModelError: an unverified family, a missing body or plain ``nn.Linear`` head (PEFT on the head,
            prompt learning), or a logit transform (softcap, logit scale) the fused loss would not reproduce.
            At forward: a head weight that nothing gathers (tensor parallel, or no gathering hooks).
    """
    _check_kind(loss)
    wrapper, model = model, _unwrap_peft(model)
    name, module = _check_model(model)
    router_aux = module.load_balancing_loss_func if FAMILIES[name][1] else None
    softcap = getattr(model.config, "final_logit_softcapping", None) if name in SOFTCAPPED else None
    if "_mileloss_original_forward" not in vars(model):
        model._mileloss_original_forward = model.forward
    model._mileloss_options = {"loss": loss, "gamma": gamma, "sigma": sigma, "ignore_index": ignore_index,
                               "chunk_size": chunk_size, "return_logits": return_logits, "router_aux": router_aux,
                               "softcap": softcap}
    model.forward = types.MethodType(_fused_forward, model)
    return wrapper


patch_causal_lm = apply_mileloss


def unpatch_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_mileloss` (no-op on an unpatched model)."""
    inner = _unwrap_peft(model)  # (a PeftModel forwards attribute look-ups to the model inside: unwrap first)
    if "_mileloss_original_forward" in vars(inner):
        del inner.forward  # the instance attribute; the class's forward shows through again
        del inner._mileloss_original_forward
        del inner._mileloss_options
    return model


unpatch = unpatch_causal_lm
