"""Per-token statistics of a causal LM on held-out tokens, overall and per frequency bucket.

For every predicted position i (target ``y_i``, logits ``z_i`` over V types, ``p_i = softmax(z_i)``):

    ce_i         = logsumexp(z_i) - z_i[y_i]                  (nats)
    H_i          = -sum_v p_iv log p_iv                       (entropy of the prediction, nats)
    w_i          = (sigma + H_i) ** gamma                     (the MiLe weight; sigma = gamma = 1 by default)
    confidence_i = max_v p_iv,   correct_i = [argmax_v z_iv == y_i]

and for any set S of positions (all of them, or those whose *target* falls in one frequency bucket):
``loss_S = mean_{i in S} ce_i``, ``ppl_S = exp(loss_S)``, accuracy, the entropy/weight distribution and the
expected calibration error ``ECE_S = sum_b |S_b|/|S| * |acc(S_b) - conf(S_b)|`` over 15 equal-width confidence
bins ``(b/15, (b+1)/15]``. Sums are accumulated in float64.

The held-out tokens are cut into consecutive, non-overlapping windows of ``seq_len + 1`` tokens that share one
boundary token (``inputs = t[s : s+T]``, ``targets = t[s+1 : s+T+1]``, ``s = 0, T, 2T, ...``), so every token but
the first is predicted exactly once, with a context that restarts at each window: deterministic and independent
of the batch size. ``max_tokens`` keeps only the first ``max_tokens + 1`` tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from mileloss.eval.buckets import FrequencyBuckets

logger = logging.getLogger(__name__)

__all__ = [
    "ECE_NUM_BINS",
    "HISTOGRAM_NUM_BINS",
    "QUANTILES",
    "collect_token_statistics",
    "evaluate_perplexity",
    "expected_calibration_error",
    "iter_windows",
    "summarize_token_statistics",
    "token_statistics",
]

ECE_NUM_BINS = 15
HISTOGRAM_NUM_BINS = 60
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ---------------------------------------------------------------------------------------------------------------
# per-token statistics


@torch.no_grad()
def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """Cross-entropy, entropy, top-1 confidence and correctness of each position.

    Args:
        logits: (N, V) scores, any float dtype (math in float32, or float64 if given float64).
        targets: (N,) int64 token ids in [0, V).

    Returns:
        Dict of (N,) numpy arrays: ``ce`` and ``entropy`` (float64, nats), ``confidence`` (float64, in [0, 1]),
        ``correct`` (bool).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_probs = torch.log_softmax(logits.to(compute_dtype), dim=-1)  # (N, V)
    probs = log_probs.exp()
    ce = -log_probs.gather(-1, targets[:, None]).squeeze(-1)
    # p * log p is 0 where p underflows to 0 (log p = -inf there would give nan)
    entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
    confidence, prediction = probs.max(-1)
    return {
        "ce": ce.double().cpu().numpy(),
        "entropy": entropy.clamp_min(0).double().cpu().numpy(),
        "confidence": confidence.double().cpu().numpy(),
        "correct": (prediction == targets).cpu().numpy(),
    }


def iter_windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive evaluation windows over a 1-D token array.

    Args:
        tokens: (L,) token ids.
        seq_len: positions per window T (the model's context length).
        batch_size: windows per yielded batch.

    Yields:
        ``(inputs, targets)``, each (B, T) int64; the last window of the array may be shorter, and then comes
        alone in its own batch so that no padding is ever needed.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    num_predicted = len(tokens) - 1
    starts = list(range(0, max(num_predicted, 0), seq_len))
    full = [s for s in starts if s + seq_len <= num_predicted]
    for i in range(0, len(full), batch_size):
        chunk = full[i : i + batch_size]
        windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in chunk])
        yield windows[:, :-1], windows[:, 1:]
    if len(full) < len(starts):  # the tail window, shorter than seq_len
        tail = np.asarray(tokens[starts[-1] :], dtype=np.int64)[None, :]
        yield tail[:, :-1], tail[:, 1:]


@torch.no_grad()
def collect_token_statistics(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Run ``model`` over ``tokens`` in windows and gather per-token statistics.

    Returns:
        The arrays of :func:`token_statistics` for all ``len(tokens) - 1`` predicted positions plus ``targets``
        (int64), in token order.
    """
    model.eval()
    parts: list[dict[str, np.ndarray]] = []
    num_windows = math.ceil(max(len(tokens) - 1, 0) / seq_len)
    with tqdm(total=num_windows, desc="perplexity", unit="window", leave=False) as progress:
        for inputs, targets in iter_windows(tokens, seq_len, batch_size):
            logits = model(torch.from_numpy(inputs).to(device)).logits  # (B, T, V')
            flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*T, V')
            flat_targets = torch.from_numpy(targets).reshape(-1).to(device)
            # a few (rows, V) float32 temporaries per chunk: keep each near 64 MiB whatever the vocabulary
            rows = max(1, (1 << 24) // flat_logits.shape[-1])
            for begin in range(0, len(flat_targets), rows):
                stats = token_statistics(flat_logits[begin : begin + rows], flat_targets[begin : begin + rows])
                stats["targets"] = flat_targets[begin : begin + rows].cpu().numpy()
                parts.append(stats)
            progress.update(len(inputs))
    if not parts:
        raise ValueError(f"need at least 2 tokens to evaluate, got {len(tokens)}")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# ---------------------------------------------------------------------------------------------------------------
# summaries


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, num_bins: int = ECE_NUM_BINS
) -> tuple[float, dict[str, list]]:
    """Expected calibration error of top-1 predictions with equal-width confidence bins.

    ``ECE = sum_b (n_b / N) * |accuracy_b - mean_confidence_b|`` with bins ``(b/B, (b+1)/B]`` (a confidence of
    exactly 0 goes to the first bin).

    Args:
        confidence: (N,) top-1 probabilities in [0, 1].
        correct: (N,) bool, whether the top-1 prediction was the target.
        num_bins: B.

    Returns:
        ``(ece, bins)`` where ``bins`` holds per-bin ``edges`` (B+1), ``count``, ``accuracy`` and
        ``confidence`` (None for empty bins) for a reliability diagram. ECE is nan for N = 0.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins)
    sum_conf = np.bincount(index, weights=confidence, minlength=num_bins)
    sum_correct = np.bincount(index, weights=correct, minlength=num_bins)
    total = len(confidence)
    ece = float(np.abs(sum_correct - sum_conf).sum() / total) if total else float("nan")
    nonempty = count > 0
    bins = {
        "edges": edges.tolist(),
        "count": count.tolist(),
        "accuracy": [float(a) if n else None
                     for a, n in zip(sum_correct / np.maximum(count, 1), nonempty, strict=True)],
        "confidence": [float(c) if n else None for c, n in zip(sum_conf / np.maximum(count, 1), nonempty, strict=True)],
    }
    return ece, bins


def _distribution(values: np.ndarray) -> dict[str, float | dict[str, float]]:
    if len(values) == 0:
        return {"mean": None, "std": None, "quantiles": {}}
    quantiles = np.quantile(values, QUANTILES)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "quantiles": {f"q{round(100 * q):02d}": float(v) for q, v in zip(QUANTILES, quantiles, strict=True)},
    }


def _group_summary(stats: dict[str, np.ndarray], mask: np.ndarray, weight: np.ndarray) -> dict:
    n = int(mask.sum())
    if n == 0:
        return {"num_tokens": 0, "loss": None, "ppl": None, "accuracy": None, "ece": None,
                "entropy": _distribution(stats["entropy"][:0]), "weight": _distribution(weight[:0])}
    loss = float(stats["ce"][mask].mean())
    ece, _ = expected_calibration_error(stats["confidence"][mask], stats["correct"][mask])
    return {
        "num_tokens": n,
        "loss": loss,
        "ppl": float(math.exp(loss)),
        "accuracy": float(stats["correct"][mask].mean()),
        "ece": ece,
        "entropy": _distribution(stats["entropy"][mask]),
        "weight": _distribution(weight[mask]),
    }


def summarize_token_statistics(
    stats: dict[str, np.ndarray],
    buckets: FrequencyBuckets,
    *,
    sigma: float = 1.0,
    gamma: float = 1.0,
    histogram_bins: int = HISTOGRAM_NUM_BINS,
) -> dict:
    """Overall and per-bucket summary of per-token statistics (the body of ``perplexity.json``).

    Args:
        stats: (N,) arrays ``ce``, ``entropy``, ``confidence``, ``correct`` and ``targets`` (as from
            :func:`collect_token_statistics`); positions are assigned to the bucket of their *target*.
        buckets: the frequency buckets over the vocabulary.
        sigma, gamma: parameters of the MiLe weight ``(sigma + H) ** gamma`` whose distribution is reported.
        histogram_bins: number of equal-width bins of the entropy and weight histograms. The edges are fixed by
            the vocabulary size (entropy in ``[0, ln V]``), so histograms of different runs line up.

    Returns:
        ``{"overall": {...}, "buckets": [{...}, ...], "histograms": {...}, "calibration": {...},
        "mile_weight": {"sigma", "gamma"}}``.
    """
    vocab_size = len(buckets.bucket_of_token)
    targets = np.asarray(stats["targets"], dtype=np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= vocab_size):
        raise ValueError(f"target ids must lie in [0, {vocab_size}), got range [{targets.min()}, {targets.max()}]")
    target_bucket = buckets.bucket_of_token[targets]
    weight = (sigma + stats["entropy"]) ** gamma

    everything = np.ones(len(targets), dtype=bool)
    overall = _group_summary(stats, everything, weight)
    per_bucket = []
    for description in buckets.descriptions:
        summary = _group_summary(stats, target_bucket == description.index, weight)
        per_bucket.append({**description.to_dict(), **summary,
                           "share_of_eval_tokens": summary["num_tokens"] / max(len(targets), 1)})

    max_entropy = math.log(vocab_size)
    entropy_edges = np.linspace(0.0, max_entropy, histogram_bins + 1)
    weight_edges = np.linspace(sigma**gamma, (sigma + max_entropy) ** gamma, histogram_bins + 1)
    if gamma < 0:  # a decreasing weight: keep the edges increasing
        weight_edges = weight_edges[::-1]
    histograms = {
        "entropy": {"edges": entropy_edges.tolist(), "overall": _histogram(stats["entropy"], entropy_edges),
                    "buckets": [_histogram(stats["entropy"][target_bucket == d.index], entropy_edges)
                                for d in buckets.descriptions]},
        "weight": {"edges": weight_edges.tolist(), "overall": _histogram(weight, weight_edges),
                   "buckets": [_histogram(weight[target_bucket == d.index], weight_edges)
                               for d in buckets.descriptions]},
    }
    _, calibration = expected_calibration_error(stats["confidence"], stats["correct"])
    return {
        "overall": overall,
        "buckets": per_bucket,
        "bucket_cut_points": list(buckets.cut_points),
        "mile_weight": {"sigma": sigma, "gamma": gamma, "formula": "(sigma + H) ** gamma"},
        "histograms": histograms,
        "calibration": calibration,
    }


def _histogram(values: np.ndarray, edges: np.ndarray) -> list[int]:
    # values on the closed right edge (H = ln V exactly) are counted in the last bin by np.histogram
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return counts.astype(int).tolist()


def evaluate_perplexity(
    model: torch.nn.Module,
    tokens: np.ndarray,
    buckets: FrequencyBuckets,
    *,
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    sigma: float = 1.0,
    gamma: float = 1.0,
) -> dict:
    """Perplexity, per-bucket perplexity, entropy/weight statistics and calibration of ``model`` on ``tokens``.

    Args:
        model: a causal LM returning ``.logits`` (B, T, V) (e.g. ``LlamaForCausalLM``), already on ``device``.
        tokens: (L,) held-out token ids (e.g. the ``val`` split).
        buckets: frequency buckets from the training counts (V entries, V = the data's vocabulary size).
        seq_len: window length T, at most the model's context.
        max_tokens: evaluate only the first ``max_tokens`` predicted positions (None = all).

    Returns:
        The dict of :func:`summarize_token_statistics` plus ``"windows"`` (seq_len, number of tokens).
    """
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
        tokens = tokens[: max_tokens + 1]
    stats = collect_token_statistics(model, tokens, seq_len=seq_len, batch_size=batch_size, device=device)
    result = summarize_token_statistics(stats, buckets, sigma=sigma, gamma=gamma)
    result["windows"] = {"seq_len": seq_len, "num_predicted_tokens": int(len(stats["ce"])),
                         "num_windows": math.ceil(len(stats["ce"]) / seq_len)}
    return result
