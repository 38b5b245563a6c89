"""The float64 test oracle, written directly from the paper's formulas. It imports nothing from mileloss.

Everything here is the naive (N, V) computation in float64: softmax, log-softmax, the entropy as a sum over
the vocabulary, the weights raised to gamma as written in the paper. It is the specification the chunked
engine is tested against, so it shares no code with it (a wrong weight formula in ``src/`` cannot pass by
being used on both sides).

Conventions of the engine that the oracle states independently:
* p = 0 entries (a -inf logit) contribute 0 to the entropy (lim p->0 of p log p).
* ``reduction="sum"``/``"none"`` and ``normalize="none"`` carry the weights times exp(-c), with c from
  :func:`sum_shift` (0 unless (sigma + ln V)^gamma > 2^32); a weighted mean does not depend on c.
"""

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def entropy_of(log_probs):
    """H = -sum_v p_v log p_v per row, with p_v log p_v = 0 where p_v = 0 (written so that its gradient is
    finite there too: the log is replaced by 0 where p = 0, not multiplied by it)."""
    probs = log_probs.exp()
    safe_log = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    return -(probs * safe_log).sum(-1)


def per_token_terms(logits, targets, weighting, gamma, sigma, ignore_index=IGNORE, detach_weight=True):
    """(ce, entropy, weight) per row in float64; ce and weight are 0 at ignored rows.

    ce_i = -log softmax(z_i)[y_i];  H_i = -sum_v p_iv log p_iv;
    ce: w = 1;  focal: w = (1 - p_i[y_i])^gamma;  mile: w = (sigma + H_i)^gamma.
    """
    z = logits.double()
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    picked = log_p.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
    ce = torch.where(valid, -picked, torch.zeros_like(picked))
    log_p_w = log_p.detach() if detach_weight else log_p
    entropy = entropy_of(log_p_w)
    if weighting == "ce":
        weight = torch.ones_like(ce)
    elif weighting == "focal":
        p_target = log_p_w.exp().gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
        weight = (1 - p_target) ** gamma
    elif weighting == "mile":
        weight = (sigma + entropy) ** gamma
    else:
        raise ValueError(weighting)
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    return ce, entropy, weight


def sum_shift(weighting, gamma, sigma, vocab):
    """The documented shift c of the unnormalised outputs: max(0, gamma ln(sigma + ln V) - 32 ln 2) for
    MiLe (so that no weight exceeds 2^32), 0 for CE and focal (whose weights are at most 1)."""
    largest_base = sigma + math.log(vocab)  # H <= ln V
    if weighting != "mile" or gamma == 0 or largest_base <= 0:  # V = 1, sigma = 0: every weight is 0
        return 0.0
    return max(0.0, gamma * math.log(largest_base) - 32 * math.log(2))


def loss(logits, targets, weighting="mile", gamma=1.0, sigma=1.0, reduction="mean", normalize="weighted",
         ignore_index=IGNORE, detach_weight=True):
    """"mean": sum_i w_i ce_i / sum_i w_i ("weighted") or / #valid ("none", times exp(-c));
    "sum": exp(-c) sum_i w_i ce_i;  "none": (N,) exp(-c) w_i ce_i (0 where ignored). An empty or all-ignored
    batch gives 0 (with a zero gradient)."""
    ce, _, weight = per_token_terms(logits, targets, weighting, gamma, sigma, ignore_index, detach_weight)
    terms = weight * ce
    if reduction == "mean" and normalize == "weighted":
        total = weight.sum()
        return terms.sum() / total if total > 0 else terms.sum() * 0
    terms = terms * math.exp(-sum_shift(weighting, gamma, sigma, logits.shape[-1]))
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    count = (targets != ignore_index).sum().double()
    return terms.sum() / count if count > 0 else terms.sum() * 0


def token_weighted_loss_reference(logits, targets, weighting="mile", gamma=1.0, sigma=1.0, ignore_index=IGNORE,
                                  reduction="mean", normalize="weighted", detach_weight=True):
    """:func:`loss` under the keyword names of the engine's ``token_weighted_loss``."""
    return loss(logits, targets, weighting, gamma, sigma, reduction, normalize, ignore_index, detach_weight)


# ---------------------------------------------------------------------------------------------------
# the official training loss (what normalize="paper" reproduces)
#
# Transcribed, formula by formula (not copied), from the classes ``InfoEntropyLoss`` (MiLe) and ``FocalLoss``
# of ``utils/trainer.py`` in github.com/suu990901/LLaMA-MiLe-Loss. The notes on the paper
# (shared/docs/paper.md) record commit e4a2edb (abbreviated, as given there) for the released code; the
# transcription was checked against the copy of utils/trainer.py at commit
# 4930a02fedff9c35e74c859df20456175cb7a994 of that repository. Per position:
#   ce   = CrossEntropyLoss(reduction="none", ignore_index=-100): 0 at ignored positions
#   MiLe: probs = clamp(softmax(detached logits), 1e-8, 1); H = sum(-probs * log probs); w = (sigma + H)^gamma,
#         sigma = 1 hard-coded there (a parameter here)
#   focal: p_t = exp(-ce) detached; w = (1 - p_t)^gamma  (so w = 0 at ignored positions)
#   alpha = 1 / mean(w) over ALL positions; all-reduced (summed) and divided by the world size
#   loss  = alpha * w * ce, then .mean() over ALL positions (ignored ones included)


def official(logits, labels, weighting="mile", gamma=1.0, sigma=1.0, ignore_index=IGNORE, alpha_override=None):
    """The per-position terms ``alpha * w * ce`` (N,) of the official loss, in float64; their ``.mean()`` is
    the loss. ``alpha_override`` stands in for the cross-rank mean of the ranks' alphas."""
    z = logits.double()
    ce = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none")
    if weighting == "mile":
        probs = torch.clamp(torch.softmax(z.detach(), dim=-1), 1e-8, 1.0)
        entropy = torch.sum(-1 * (probs * torch.log(probs)), dim=-1)
        weight = (sigma + entropy) ** gamma
    elif weighting == "focal":
        p_t = torch.exp(-ce).detach()
        weight = (1 - p_t) ** gamma
    else:
        weight = torch.ones_like(ce)
    alpha = 1.0 / weight.mean() if alpha_override is None else alpha_override
    return alpha * weight * ce


def official_loss(logits, labels, weighting="mile", gamma=1.0, sigma=1.0, ignore_index=IGNORE):
    """The official loss itself: the mean over all positions of :func:`official`'s terms."""
    return official(logits, labels, weighting, gamma, sigma, ignore_index).mean()
