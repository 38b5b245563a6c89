"""The float64 test oracle, written directly from the paper's formulas (independent of mileloss)."""

import torch

IGNORE = -100


def per_token_terms(logits, targets, weighting, gamma, sigma, ignore_index=IGNORE, detach_weight=True):
    """(ce, entropy, weight) per row in float64; ce and weight are 0 at ignored rows."""
    z = logits.double()
    log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
    valid = targets != ignore_index
    picked = log_p.gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1)
    ce = torch.where(valid, -picked, torch.zeros_like(picked))
    log_p_w = log_p if not detach_weight else log_p.detach()
    entropy = -(log_p_w.exp() * log_p_w).sum(-1)
    if weighting == "ce":
        weight = torch.ones_like(ce)
    elif weighting == "focal":
        p_target = torch.exp(-(ce if not detach_weight else ce.detach()))
        weight = (1 - p_target) ** gamma
    else:
        weight = (sigma + entropy) ** gamma
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    return ce, entropy, weight


def loss(logits, targets, weighting="mile", gamma=1.0, sigma=1.0, reduction="mean", normalize="weighted",
         ignore_index=IGNORE, detach_weight=True):
    ce, _, weight = per_token_terms(logits, targets, weighting, gamma, sigma, ignore_index, detach_weight)
    terms = weight * ce
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    total = weight.sum() if normalize == "weighted" else (targets != ignore_index).sum().double()
    return terms.sum() / total if total > 0 else terms.sum() * 0


def official(logits, labels, weighting="mile", gamma=1.0, sigma=1.0, ignore_index=IGNORE, alpha_override=None):
    """The released training loss, formula by formula: clamped softmax entropy, alpha and mean over all
    positions (ignored ones included). ``alpha_override`` stands in for the cross-rank mean of alphas."""
    z = logits.double()
    ce = torch.nn.functional.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none")
    probs = torch.softmax(z, dim=-1).clamp(1e-8, 1.0).detach()
    entropy = -(probs * torch.log(probs)).sum(-1)
    if weighting == "mile":
        weight = (sigma + entropy) ** gamma
    elif weighting == "focal":
        weight = (1 - torch.exp(-ce.detach())) ** gamma
    else:
        weight = torch.ones_like(ce)
    alpha = 1.0 / weight.mean() if alpha_override is None else alpha_override
    return alpha * weight * ce
