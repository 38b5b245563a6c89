"""The float64 test oracle, written directly from the paper's formulas. It imports nothing from mileloss.

Everything here is the naive (N, V) computation in float64: softmax, log-softmax, the entropy as a sum over
the vocabulary, the weights raised to gamma as written in the paper. It is the specification the chunked
engine is tested against, so it shares no code with it (a wrong weight formula in ``src/`` cannot pass by
being used on both sides).

Conventions of the engine that the oracle states independently:
* p = 0 entries (a -inf logit) contribute 0 to the entropy (lim p->0 of p log p).
* ``reduction="sum"``/``"none"`` and ``normalize="none"`` carry the weights times exp(-c), with c from
  :func:`sum_shift` (0 unless (sigma + ln V)^gamma > 2^32); a weighted mean does not depend on c.

The options of issue 12, stated here as plain formulas:
* ``softcap=s``: z <- s tanh(z / s) first; everything below reads the capped logits.
* ``label_smoothing=eps``: ce_i = (1 - eps) nll_i + eps (lse_i - mean_v z_iv) (F.cross_entropy's definition);
  focal's p_y is exp(-nll_i), MiLe's H the entropy of softmax(z_i).
* ``token_weights=t``: every weight w_i becomes t_i w_i (the token-count normaliser of normalize="none"
  becomes sum of t over valid tokens).
* ``z_loss=c``: mean reductions add c * sum_valid t_i lse_i^2 / sum_valid t_i; "sum" adds
  c exp(-shift) sum_valid t_i lse_i^2, "none" c exp(-shift) t_i lse_i^2 per token.
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


def capped(logits, softcap):
    """s * tanh(z / s) in float64 (z itself when softcap is None)."""
    z = logits.double()
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def per_token_terms(logits, targets, weighting, gamma, sigma, ignore_index=IGNORE, detach_weight=True,
                    softcap=None, label_smoothing=0.0, token_weights=None):
    """(ce, entropy, weight) per row in float64; ce and weight are 0 at ignored rows.

    nll_i = -log softmax(z_i)[y_i];  ce_i = (1 - eps) nll_i - eps mean_v log softmax(z_i)_v;
    H_i = -sum_v p_iv log p_iv;  ce: w = 1;  focal: w = (1 - p_i[y_i])^gamma;  mile: w = (sigma + H_i)^gamma;
    then w_i *= t_i.
    """
    z = capped(logits, softcap)
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    picked = log_p.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
    ce = -picked
    if label_smoothing:
        ce = (1 - label_smoothing) * ce + label_smoothing * -log_p.mean(-1)  # lse - mean z = -mean log p
    ce = torch.where(valid, ce, torch.zeros_like(ce))
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
    if token_weights is not None:
        weight = weight * token_weights.double().reshape(-1)
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
         ignore_index=IGNORE, detach_weight=True, softcap=None, label_smoothing=0.0, token_weights=None, z_loss=0.0):
    """"mean": sum_i w_i ce_i / sum_i w_i ("weighted") or / #valid ("none", times exp(-c));
    "sum": exp(-c) sum_i w_i ce_i;  "none": (N,) exp(-c) w_i ce_i (0 where ignored). An empty or all-ignored
    batch gives 0 (with a zero gradient). With token weights #valid is sum of t over valid tokens; the z-loss
    term of :func:`z_term` is added."""
    ce, _, weight = per_token_terms(logits, targets, weighting, gamma, sigma, ignore_index, detach_weight,
                                    softcap, label_smoothing, token_weights)
    terms = weight * ce
    z = z_term(logits, targets, reduction, z_loss, ignore_index, softcap, token_weights,
               math.exp(-sum_shift(weighting, gamma, sigma, logits.shape[-1])))
    if reduction == "mean" and normalize == "weighted":
        total = weight.sum()
        return (terms.sum() / total if total > 0 else terms.sum() * 0) + z
    terms = terms * math.exp(-sum_shift(weighting, gamma, sigma, logits.shape[-1]))
    if reduction == "none":
        return terms + z
    if reduction == "sum":
        return terms.sum() + z
    count = token_mass(targets, ignore_index, token_weights).sum()
    return (terms.sum() / count if count > 0 else terms.sum() * 0) + z


def token_mass(targets, ignore_index=IGNORE, token_weights=None):
    """t_i at valid tokens (1 without token weights), 0 at ignored ones, float64."""
    valid = (targets != ignore_index).double()
    return valid if token_weights is None else valid * token_weights.double().reshape(-1)


def z_term(logits, targets, reduction, z_loss, ignore_index=IGNORE, softcap=None, token_weights=None,
           sum_factor=1.0):
    """The z-loss: c * sum_valid t lse^2 / sum_valid t for "mean"; c * sum_factor * t_i lse_i^2 per token
    ("none") or summed ("sum"). 0 (a float) when z_loss is 0."""
    if not z_loss:
        return 0.0
    lse = torch.logsumexp(capped(logits, softcap), dim=-1)
    mass = token_mass(targets, ignore_index, token_weights)
    per_token = torch.where(mass > 0, mass * lse**2, torch.zeros_like(lse))
    if reduction == "none":
        return z_loss * sum_factor * per_token
    if reduction == "sum":
        return z_loss * sum_factor * per_token.sum()
    total = mass.sum()
    return z_loss * per_token.sum() / total if total > 0 else per_token.sum() * 0


def token_weighted_loss_reference(logits, targets, weighting="mile", gamma=1.0, sigma=1.0, ignore_index=IGNORE,
                                  reduction="mean", normalize="weighted", detach_weight=True, **options):
    """:func:`loss` under the keyword names of the engine's ``token_weighted_loss``."""
    return loss(logits, targets, weighting, gamma, sigma, reduction, normalize, ignore_index, detach_weight,
                **options)


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


def official(logits, labels, weighting="mile", gamma=1.0, sigma=1.0, ignore_index=IGNORE, alpha_override=None,
             softcap=None, label_smoothing=0.0, token_weights=None):
    """The per-position terms ``alpha * w * ce`` (N,) of the official loss, in float64; their ``.mean()`` is
    the loss. ``alpha_override`` stands in for the cross-rank mean of the ranks' alphas. The issue-12 options
    (not in the official code) extend it as in :func:`per_token_terms`: capped logits, smoothed ce (focal's
    p_t from the unsmoothed nll), w *= t at every position."""
    z = capped(logits, softcap)
    nll = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none")
    ce = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if weighting == "mile":
        probs = torch.clamp(torch.softmax(z.detach(), dim=-1), 1e-8, 1.0)
        entropy = torch.sum(-1 * (probs * torch.log(probs)), dim=-1)
        weight = (sigma + entropy) ** gamma
    elif weighting == "focal":
        p_t = torch.exp(-nll).detach()
        weight = (1 - p_t) ** gamma
    else:
        weight = torch.ones_like(ce)
    if token_weights is not None:
        weight = weight * token_weights.double().reshape(-1)
    alpha = 1.0 / weight.mean() if alpha_override is None else alpha_override
    return alpha * weight * ce


def official_loss(logits, labels, weighting="mile", gamma=1.0, sigma=1.0, ignore_index=IGNORE, softcap=None,
                  label_smoothing=0.0, token_weights=None, z_loss=0.0):
    """The official loss itself: the mean over all positions of :func:`official`'s terms (+ the z-loss mean)."""
    terms = official(logits, labels, weighting, gamma, sigma, ignore_index, softcap=softcap,
                     label_smoothing=label_smoothing, token_weights=token_weights)
    return terms.mean() + z_term(logits, labels, "mean", z_loss, ignore_index, softcap, token_weights)
