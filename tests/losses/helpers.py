"""Inputs and gradients shared by the loss tests."""

from __future__ import annotations

import torch

from tests import reference


def make_batch(n, v, dtype=torch.float64, ignore_every=5, scale=3.0):
    """(n, v) logits drawn in float64 then cast to ``dtype``, and (n,) targets with every ``ignore_every``-th
    ignored."""
    logits = torch.randn(n, v, dtype=torch.float64) * scale
    targets = torch.randint(0, v, (n,))
    if ignore_every:
        targets[::ignore_every] = reference.IGNORE
    return logits.to(dtype), targets


def grads_of(fn, *tensors, grad_output=None):
    """``fn`` on fresh leaf copies of ``tensors`` (None stays None), backward of ``sum(out * grad_output)``:
    ``(out, [grad of each tensor])``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * (grad_output if grad_output is not None else 1.0)).sum().backward()
    return out.detach(), [None if leaf is None else leaf.grad for leaf in leaves]
