"""``MiLeTrainer``: a drop-in ``transformers.Trainer`` whose focal and MiLe gradients are exact under gradient
accumulation and DDP, the gradients of one step on the whole global batch.

The weighted mean sum_i w_i CE_i / sum_i w_i of a step has a denominator that no micro-batch knows. With the plain
``Trainer`` each micro-batch back-propagates its own weighted mean times ``local tokens / num_items_in_batch``, the
token-count-weighted average of the micro-batch means: exact for CE, not for focal and MiLe. ``MiLeTrainer``
does what ``mileloss.losses.WeightNormalizer`` does in our own loop: each micro-batch back-propagates its
unnormalised sum times the fixed scale ``1 / num_items_in_batch``, the patched model hands the micro-batch's
``TokenStats`` to the trainer, and once the step's last micro-batch is back-propagated the gradients are
multiplied by ``world / (scale * W_global)`` (W all-reduced over the processes) *before* they are clipped and
the optimizer steps. The logged ``loss`` is the exact global weighted mean of the step.

Where the rescale happens (the version assumption). ``Trainer`` clips the gradients inside its training loop,
before any callback runs (``on_pre_optimizer_step`` comes after the clip), so a callback cannot do it. In
``transformers`` 5.x (written against 5.24.0) every optimizer step of ``Trainer._run_epoch`` calls
``self._clip_grad_norm(model)`` when ``max_grad_norm > 0`` and then always ``self._get_grad_norm(model,
grad_norm)``, both before ``optimizer.step()``; ``MiLeTrainer`` overrides both to rescale first (once per step).
It also sets ``loss_is_scaled_for_ga = True`` (the Trainer then does not divide the loss by the accumulation
steps) and adds the exact loss to ``self._tr_loss``, the running sum the Trainer logs. A ``transformers`` without
``_clip_grad_norm``/``_get_grad_norm`` is refused at construction (``TrainerSetupError``), never silently
inexact.

Refused setups (``TrainerSetupError``): a model not patched by ``apply_mileloss``, a ``compute_loss_func`` or
label smoothing (they replace the model's loss), DeepSpeed and FSDP (their engines clip inside their own step;
not supported yet), ``DataParallel`` (``n_gpu > 1``), and an MoE model that adds its router auxiliary loss
(rescaling would scale it too).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import Trainer

from mileloss.errors import TrainerSetupError
from mileloss.losses import WeightNormalizer

__all__ = ["MiLeTrainer"]

_HOOKS = ("_clip_grad_norm", "_get_grad_norm", "compute_loss", "training_step")


class MiLeTrainer(Trainer):
    """``transformers.Trainer`` with exact focal/MiLe normalisation across accumulation steps and processes.

    >>> model = apply_mileloss(LlamaForCausalLM(config), loss="mile", gamma=1.0, sigma=1.0)   # doctest: +SKIP
    >>> MiLeTrainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=4),
    ...             train_dataset=data).train()                                               # doctest: +SKIP

    Takes exactly the arguments of ``Trainer``. Evaluation is unchanged (the patched model's mean loss).

    Raises:
        TrainerSetupError: see the module docstring for the setups it refuses.
    """

    loss_is_scaled_for_ga = True  # compute_loss returns sum * (1 / num_items_in_batch): no division by the steps

    def __init__(self, *args, **kwargs):
        missing = [name for name in _HOOKS if not callable(getattr(Trainer, name, None))]
        if missing:
            import transformers

            raise TrainerSetupError(
                f"MiLeTrainer overrides Trainer.{', Trainer.'.join(missing)}, which transformers "
                f"{transformers.__version__} does not have (written against 5.24.0)")
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if callable(getattr(model, "get_base_model", None)):  # a peft.PeftModel: the patched model is inside
            model = model.get_base_model()
        if not hasattr(model, "_mileloss_options"):
            raise TrainerSetupError(
                f"MiLeTrainer needs a model patched by mileloss.integrations.apply_mileloss(model, loss=...); "
                f"{type(model).__name__} is not")
        self._mileloss_model = model
        if self.compute_loss_func is not None or self.label_smoother is not None:
            raise TrainerSetupError("MiLeTrainer takes the loss from the patched model: pass neither "
                                    "compute_loss_func nor label_smoothing_factor")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise TrainerSetupError("MiLeTrainer does not support DeepSpeed or FSDP yet (their engines clip the "
                                    "gradients inside their own step, before the rescale could run)")
        if self.args.n_gpu > 1:
            raise TrainerSetupError(f"MiLeTrainer does not support torch.nn.DataParallel (n_gpu = "
                                    f"{self.args.n_gpu}); launch one process per GPU (torchrun / accelerate)")
        options = model._mileloss_options
        if options.get("router_aux") is not None and getattr(model.config, "output_router_logits", False):
            raise TrainerSetupError(
                f"{type(model).__name__} adds its router auxiliary loss (config.output_router_logits = True), "
                "which the exact rescale would scale too: set it to False, or use Trainer")
        self._mileloss_normalizer: WeightNormalizer | None = None

    # -- the patched model calls this with each training micro-batch's stats ------------------------------------

    def _mileloss_collect(self, stats, num_items_in_batch) -> float:
        """Record one micro-batch; return the fixed scale its ``reduction="sum"`` loss is multiplied by."""
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        world = 1 if group is None else dist.get_world_size(group)
        if self._mileloss_normalizer is None:
            self._mileloss_normalizer = WeightNormalizer(process_group=group if world > 1 else None)
        # the same scale on every micro-batch and rank: the global count (HF's default), else 1
        scale = 1.0
        if num_items_in_batch is not None and (world == 1 or self.args.average_tokens_across_devices):
            scale = 1.0 / max(float(num_items_in_batch), 1.0)
        self._mileloss_normalizer.add(stats, scale)
        return scale

    def _mileloss_rescale(self, model) -> None:
        """Once per optimizer step, after the last backward and before clipping: exact gradients and loss."""
        normalizer, self._mileloss_normalizer = self._mileloss_normalizer, None
        if normalizer is None:
            return
        loss = normalizer.rescale_gradients_(model.parameters())
        self._tr_loss += loss.to(self._tr_loss.device, self._tr_loss.dtype)

    # -- Trainer hooks -------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        unwrapped = self._mileloss_model
        unwrapped._mileloss_collector = self._mileloss_collect
        try:
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            outputs = model(**inputs, **extra)
        finally:
            del unwrapped._mileloss_collector
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the micro-batch's sum means nothing on its own: the exact loss is added to _tr_loss at the rescale
        return torch.zeros_like(loss)

    def _clip_grad_norm(self, model):
        self._mileloss_rescale(model)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._mileloss_rescale(model)
        return super()._get_grad_norm(model, grad_norm=grad_norm)
