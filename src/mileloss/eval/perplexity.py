"""Per-token statistics of a causal LM on held-out tokens, overall and per frequency bucket.

For every predicted position i (target ``y_i``, logits ``z_i = W h_i (+ b)`` over V types from the final hidden
state ``h_i`` and the LM head ``W``, ``p_i = softmax(z_i)``):

    ce_i         = logsumexp(z_i) - z_i[y_i]                  (nats)
    H_i          = -sum_v p_iv log p_iv                       (entropy of the prediction, nats)
    w_i          = the weight of the run's own loss:  1 (ce),  (1 - p_i[y_i]) ** gamma (focal),
                   (sigma + H_i) ** gamma (mile), with the run's gamma and sigma
    confidence_i = max_v p_iv = exp(max_v z_iv - logsumexp(z_i)),   correct_i = [z_i[y_i] == max_v z_iv]

All of them come from one pass of the loss engine (:func:`mileloss.linear_token_weighted_loss` with
``return_stats=True``: ``ce``, ``entropy``, ``weight``, ``lse``, ``max_logit`` and ``correct``) on the hidden
states, so the (B, T, V) logits are never built and the LM head's GEMM runs once. ``correct_i`` is
``z_i[y_i] == max_v z_iv``: a tie counts as correct (``argmax`` would pick the first of the tied types).

For any set S of positions (all of them, or those whose *target* falls in one frequency bucket):
``loss_S = mean_{i in S} ce_i``, ``ppl_S = exp(loss_S)``, accuracy, the entropy/weight distribution and the
expected calibration error ``ECE_S = sum_b |S_b|/|S| * |acc(S_b) - conf(S_b)|`` over 15 equal-width confidence
bins ``(b/15, (b+1)/15]``. Sums are accumulated in float64.

The held-out tokens are cut into consecutive, non-overlapping windows of ``seq_len + 1`` tokens that share one
boundary token (``inputs = t[s : s+T]``, ``targets = t[s+1 : s+T+1]``, ``s = 0, T, 2T, ...``), so every token but
the first is predicted exactly once, with a context that restarts at each window: deterministic and independent
of the batch size. ``max_tokens`` keeps only the first ``max_tokens + 1`` tokens.

Each window is also one *block* of :func:`block_sums` (``eval/blocks.npz``): the per-bucket sums of ``ce_i`` and
the token counts of its positions, with its start, length and a hash of its targets, so that two runs evaluated
on the same tokens can be compared block by block (a paired bootstrap in ``mileloss report``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mileloss.data.loader import iter_token_windows
from mileloss.errors import BlocksFileError, CheckpointError
from mileloss.eval.buckets import FrequencyBuckets

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCKS_FORMAT",
    "BlockSums",
    "ECE_NUM_BINS",
    "block_sums",
    "read_blocks",
    "HISTOGRAM_NUM_BINS",
    "QUANTILES",
    "collect_token_statistics",
    "evaluate_perplexity",
    "expected_calibration_error",
    "head_token_statistics",
    "summarize_token_statistics",
    "token_weight",
    "write_blocks",
]

ECE_NUM_BINS = 15
HISTOGRAM_NUM_BINS = 60
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
WEIGHTINGS = ("ce", "focal", "mile")


# ---------------------------------------------------------------------------------------------------------------
# per-token statistics


@torch.no_grad()
def head_token_statistics(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    *,
    weighting: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
) -> dict[str, np.ndarray]:
    """Cross-entropy, entropy, loss weight, top-1 confidence and correctness of each row, from hidden states.

    Args:
        hidden: (N, D) final hidden states.   head_weight: (V, D) LM-head weight, same dtype.   head_bias: (V,) or None.
        targets: (N,) int64 token ids in [0, V).
        weighting, gamma, sigma: the weight of the run's loss (``ce``, ``focal`` or ``mile``).

    Returns:
        Dict of (N,) numpy arrays: ``ce``, ``entropy``, ``weight`` and ``confidence`` (float64), ``correct`` (bool).
        Math in float32 (float64 for float64 inputs), as in the loss engine.
    """
    from mileloss import linear_token_weighted_loss

    _, stats = linear_token_weighted_loss(hidden, head_weight, targets, head_bias, weighting=weighting,
                                          gamma=gamma, sigma=sigma, reduction="sum", return_stats=True)
    # exp(max z - lse) <= 1 up to the rounding of lse = max z + log sum exp(z - max z)
    confidence = torch.exp(stats.max_logit.double() - stats.lse.double()).clamp(max=1.0)
    return {
        "ce": stats.ce.double().cpu().numpy(),
        "entropy": stats.entropy.double().clamp_min(0).cpu().numpy(),
        "weight": stats.log_weight.double().exp().cpu().numpy(),  # float64: w overflows float32 at large gamma
        "confidence": confidence.cpu().numpy(),
        "correct": stats.correct.cpu().numpy(),
    }


def _model_parts(model: torch.nn.Module):
    """(body returning ``last_hidden_state``, LM-head weight, LM-head bias) of a Hugging Face causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise CheckpointError(f"{type(model).__name__}: not a causal LM with a base model and a linear LM head "
                              f"(get_output_embeddings)")
    return body, head.weight, getattr(head, "bias", None)


def _check_logits_are_the_head_of_the_hidden_states(model, body, weight, bias, inputs: torch.Tensor) -> None:
    """The engine sees ``hidden @ W.T + b``; refuse models whose logits are something else (soft-capping, scaling).

    Compares both on at most 8 positions of one window: a (1, 8, V) tensor, never more.
    """
    probe = inputs[:1, :8]
    logits = model(input_ids=probe).logits.float()
    hidden = body(input_ids=probe).last_hidden_state
    head = torch.nn.functional.linear(hidden, weight, bias).float()
    scale = logits.abs().max().clamp_min(1.0)
    tolerance = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 5e-2
    if not torch.allclose(logits, head, rtol=tolerance, atol=tolerance * float(scale)):
        raise CheckpointError(
            f"{type(model).__name__}: its logits are not lm_head(final hidden state) (largest difference "
            f"{float((logits - head).abs().max()):.3g}; logit soft-capping or scaling?), so the loss engine's "
            f"statistics would not be this model's"
        )


@torch.no_grad()
def collect_token_statistics(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    weighting: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
) -> dict[str, np.ndarray]:
    """Run ``model`` over ``tokens`` in windows and gather per-token statistics from its final hidden states.

    Args:
        model: a Hugging Face causal LM whose logits are ``lm_head(base_model(...).last_hidden_state)``.
        weighting, gamma, sigma: the run's loss, for the ``weight`` column.

    Returns:
        The arrays of :func:`head_token_statistics` for all ``len(tokens) - 1`` predicted positions plus
        ``targets`` (int64), in token order.

    Raises:
        CheckpointError: if the model's logits are not its LM head applied to its final hidden states.
    """
    model.eval()
    body, weight, bias = _model_parts(model)
    parts: list[dict[str, np.ndarray]] = []
    num_windows = math.ceil(max(len(tokens) - 1, 0) / seq_len)
    with tqdm(total=num_windows, desc="perplexity", unit="window", leave=False) as progress:
        for inputs, targets in iter_token_windows(tokens, seq_len, batch_size, tail="short"):
            inputs_t = torch.from_numpy(inputs).to(device)
            if not parts:
                _check_logits_are_the_head_of_the_hidden_states(model, body, weight, bias, inputs_t)
            hidden = body(input_ids=inputs_t).last_hidden_state.to(weight.dtype)  # (B, T, D)
            flat_targets = torch.from_numpy(targets).reshape(-1).to(device)
            stats = head_token_statistics(hidden.reshape(-1, hidden.shape[-1]), weight, flat_targets, bias,
                                          weighting=weighting, gamma=gamma, sigma=sigma)
            stats["targets"] = targets.reshape(-1)
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


WEIGHT_FORMULAS = {"ce": "1", "focal": "(1 - p_target) ** gamma", "mile": "(sigma + H) ** gamma"}


def token_weight(stats: dict[str, np.ndarray], weighting: str, gamma: float, sigma: float) -> np.ndarray:
    """The loss weight of every position from its ``entropy`` and ``ce`` (p_target = exp(-ce)), in float64."""
    if weighting == "ce":
        return np.ones_like(np.asarray(stats["ce"], dtype=np.float64))
    if weighting == "focal":
        return np.clip(1.0 - np.exp(-np.asarray(stats["ce"], dtype=np.float64)), 0.0, None) ** gamma
    return (sigma + np.asarray(stats["entropy"], dtype=np.float64)) ** gamma


def _weight_edges(weighting: str, gamma: float, sigma: float, max_entropy: float, bins: int) -> np.ndarray:
    """Fixed histogram edges of the weight: its whole range for the vocabulary, so runs line up."""
    low, high = (sigma**gamma, (sigma + max_entropy) ** gamma) if weighting == "mile" else (0.0, 1.0)
    if high <= low:  # gamma = 0: a constant weight; one unit-wide range around it
        low, high = low - 0.5, low + 0.5
    return np.linspace(low, high, bins + 1)


def summarize_token_statistics(
    stats: dict[str, np.ndarray],
    buckets: FrequencyBuckets,
    *,
    weighting: str = "mile",
    sigma: float = 1.0,
    gamma: float = 1.0,
    histogram_bins: int = HISTOGRAM_NUM_BINS,
) -> dict:
    """Overall and per-bucket summary of per-token statistics (the body of ``perplexity.json``).

    Args:
        stats: (N,) arrays ``ce``, ``entropy``, ``confidence``, ``correct``, ``targets`` and optionally ``weight``
            (as from :func:`collect_token_statistics`; without it the weight is computed from ``weighting``);
            positions are assigned to the bucket of their *target*.
        buckets: the frequency buckets over the vocabulary.
        weighting, sigma, gamma: the loss weight whose distribution is reported (see :data:`WEIGHT_FORMULAS`).
        histogram_bins: number of equal-width bins of the entropy and weight histograms. The edges are fixed by
            the vocabulary size (entropy in ``[0, ln V]``), so histograms of different runs line up.

    Returns:
        ``{"overall": {...}, "buckets": [{...}, ...], "histograms": {...}, "calibration": {...},
        "loss_weight": {"kind", "gamma", "sigma", "formula"}}``.
    """
    if weighting not in WEIGHT_FORMULAS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHT_FORMULAS)}, got {weighting!r}")
    if not (math.isfinite(gamma) and math.isfinite(sigma) and gamma >= 0 and sigma >= 0):
        raise ValueError(f"gamma and sigma must be finite and >= 0, got {gamma} and {sigma}")
    vocab_size = len(buckets.bucket_of_token)
    targets = np.asarray(stats["targets"], dtype=np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= vocab_size):
        raise ValueError(f"target ids must lie in [0, {vocab_size}), got range [{targets.min()}, {targets.max()}]")
    target_bucket = buckets.bucket_of_token[targets]
    weight = np.asarray(stats["weight"], dtype=np.float64) if "weight" in stats else token_weight(
        stats, weighting, gamma, sigma)

    everything = np.ones(len(targets), dtype=bool)
    overall = _group_summary(stats, everything, weight)
    per_bucket = []
    for description in buckets.descriptions:
        summary = _group_summary(stats, target_bucket == description.index, weight)
        per_bucket.append({**description.to_dict(), **summary,
                           "share_of_eval_tokens": summary["num_tokens"] / max(len(targets), 1)})

    max_entropy = math.log(vocab_size)
    entropy_edges = np.linspace(0.0, max_entropy, histogram_bins + 1)
    weight_edges = _weight_edges(weighting, gamma, sigma, max_entropy, histogram_bins)
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
        "loss_weight": {"kind": weighting, "gamma": gamma, "sigma": sigma, "formula": WEIGHT_FORMULAS[weighting]},
        "histograms": histograms,
        "calibration": calibration,
    }


def _histogram(values: np.ndarray, edges: np.ndarray) -> list[int]:
    # values on the closed right edge (H = ln V exactly) are counted in the last bin by np.histogram
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return counts.astype(int).tolist()


# ---------------------------------------------------------------------------------------------------------------
# per-block sums: what a paired bootstrap over held-out tokens needs, and nothing more

BLOCKS_FORMAT = 1
"""Version of the ``blocks.npz`` layout; bumped on any change to the arrays it holds."""


@dataclasses.dataclass(frozen=True)
class BlockSums:
    """Per-block, per-bucket sums of cross-entropy over the evaluated positions.

    Block ``i`` is evaluation window ``i``: predicted positions ``start[i] + 1 ... start[i] + length[i]`` of the
    evaluated token array (the targets). ``target_hash[i]`` is the first 8 bytes of the BLAKE2b hash of those
    targets (int64 little-endian), so blocks of two evaluations pair only when they hold the same tokens.
    ``ce_sum[i, k]`` (float64, nats) and ``count[i, k]`` sum over the block's positions whose target is in bucket k.
    """

    start: np.ndarray  # (B,) int64
    length: np.ndarray  # (B,) int64
    target_hash: np.ndarray  # (B,) uint64
    ce_sum: np.ndarray  # (B, K) float64
    count: np.ndarray  # (B, K) int64
    bucket_names: tuple[str, ...]
    cut_points: tuple[float, ...]
    seq_len: int

    @property
    def num_blocks(self) -> int:
        return len(self.start)

    def totals(self) -> tuple[list[float], list[int]]:
        """Per-bucket ``(ce sums, token counts)`` over all blocks: ``math.fsum`` of the blocks' float64 sums, so the
        totals in ``perplexity.json`` are reproducible from the file exactly."""
        return ([math.fsum(self.ce_sum[:, k].tolist()) for k in range(self.ce_sum.shape[1])],
                [int(c) for c in self.count.sum(axis=0)])


def _target_hash(targets: np.ndarray) -> int:
    digest = hashlib.blake2b(np.ascontiguousarray(targets, dtype="<i8").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def block_sums(stats: dict[str, np.ndarray], buckets: FrequencyBuckets, seq_len: int) -> BlockSums:
    """Cut the per-position ``ce`` and ``targets`` (in token order, as from :func:`collect_token_statistics`) into the
    evaluation windows of ``seq_len`` positions and sum the cross-entropy per window and target bucket."""
    targets = np.asarray(stats["targets"], dtype=np.int64)
    ce = np.asarray(stats["ce"], dtype=np.float64)
    num_buckets = len(buckets.descriptions)
    starts = np.arange(0, len(targets), seq_len, dtype=np.int64)
    lengths = np.minimum(seq_len, len(targets) - starts)
    bucket = buckets.bucket_of_token[targets].astype(np.int64)
    block = np.arange(len(targets), dtype=np.int64) // seq_len
    flat = block * num_buckets + bucket
    size = len(starts) * num_buckets
    ce_sum = np.bincount(flat, weights=ce, minlength=size).reshape(len(starts), num_buckets)
    count = np.bincount(flat, minlength=size).astype(np.int64).reshape(len(starts), num_buckets)
    hashes = np.array([_target_hash(targets[s : s + seq_len]) for s in starts.tolist()], dtype=np.uint64)
    return BlockSums(start=starts, length=lengths.astype(np.int64), target_hash=hashes, ce_sum=ce_sum, count=count,
                     bucket_names=tuple(d.name for d in buckets.descriptions),
                     cut_points=tuple(float(c) for c in buckets.cut_points), seq_len=int(seq_len))


def write_blocks(blocks: BlockSums) -> bytes:
    """The ``blocks.npz`` bytes of ``blocks`` (plain numeric and fixed-width text arrays: loads without pickle)."""
    image = io.BytesIO()
    np.savez(image, format=np.array(BLOCKS_FORMAT, dtype=np.int64), start=blocks.start, length=blocks.length,
             target_hash=blocks.target_hash, ce_sum=blocks.ce_sum, count=blocks.count,
             bucket_names=np.array(blocks.bucket_names, dtype=str),
             cut_points=np.array(blocks.cut_points, dtype=np.float64), seq_len=np.array(blocks.seq_len, dtype=np.int64))
    return image.getvalue()


BLOCK_ARRAYS = {"format": ("i", 0), "start": ("i", 1), "length": ("i", 1), "target_hash": ("u", 1),
                "ce_sum": ("f", 2), "count": ("i", 2), "bucket_names": ("U", 1), "cut_points": ("f", 1),
                "seq_len": ("i", 0)}
"""Every array of ``blocks.npz``: (numpy dtype kind, number of dimensions)."""
MAX_BLOCKS_BYTES = 1 << 30
"""Largest uncompressed content of a ``blocks.npz`` read (a crafted archive cannot exhaust memory)."""


def read_blocks(path: str | Path, sha256: str | None = None) -> BlockSums:
    """Read and check a ``blocks.npz``: loaded with ``allow_pickle=False``, every array of the expected kind and
    shape, finite non-negative sums, consistent counts, at most :data:`MAX_BLOCKS_BYTES` unpacked; and, when
    given, the file's sha256 (recorded in ``perplexity.json``).

    Raises:
        BlocksFileError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BlocksFileError(f"{path}: cannot be read ({error})") from error
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BlocksFileError(f"{path}: sha256 differs from the one recorded in perplexity.json (changed or damaged "
                              f"since `mileloss eval` wrote it); re-run `mileloss eval`")
    unreadable = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as listing:
            unpacked = sum(info.file_size for info in listing.infolist())
    except unreadable as error:
        raise BlocksFileError(f"{path}: not a readable blocks file ({type(error).__name__}: {error})") from error
    if unpacked > MAX_BLOCKS_BYTES:
        raise BlocksFileError(f"{path}: unpacks to {unpacked} bytes, more than a blocks file holds "
                              f"({MAX_BLOCKS_BYTES})")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except unreadable as error:
        raise BlocksFileError(f"{path}: not a readable blocks file ({type(error).__name__}: {error})") from error
    for name, (kind, ndim) in BLOCK_ARRAYS.items():
        if name not in arrays:
            raise BlocksFileError(f"{path}: missing the array {name!r}")
        if arrays[name].dtype.kind != kind or arrays[name].ndim != ndim:
            raise BlocksFileError(f"{path}: array {name!r} has dtype {arrays[name].dtype} and {arrays[name].ndim} "
                                  f"dimensions, expected kind {kind!r} and {ndim}")
    if int(arrays["format"]) != BLOCKS_FORMAT:
        raise BlocksFileError(f"{path}: format {int(arrays['format'])}, this mileloss reads {BLOCKS_FORMAT}")
    num_blocks, num_buckets = arrays["ce_sum"].shape
    shapes = {"start": (num_blocks,), "length": (num_blocks,), "target_hash": (num_blocks,),
              "count": (num_blocks, num_buckets), "bucket_names": (num_buckets,)}
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise BlocksFileError(f"{path}: array {name!r} has shape {arrays[name].shape}, expected {shape}")
    ce_sum, count, length = arrays["ce_sum"], arrays["count"].astype(np.int64), arrays["length"].astype(np.int64)
    if num_blocks == 0 or num_buckets == 0:
        raise BlocksFileError(f"{path}: holds no blocks")
    if not np.isfinite(ce_sum).all() or (ce_sum < 0).any() or (count < 0).any() or (length < 1).any():
        raise BlocksFileError(f"{path}: negative or non-finite sums or counts")
    if not np.array_equal(count.sum(axis=1), length):
        raise BlocksFileError(f"{path}: the bucket counts of a block do not add up to its length")
    return BlockSums(start=arrays["start"].astype(np.int64), length=length, target_hash=arrays["target_hash"],
                     ce_sum=ce_sum.astype(np.float64), count=count,
                     bucket_names=tuple(str(n) for n in arrays["bucket_names"]),
                     cut_points=tuple(float(c) for c in arrays["cut_points"]), seq_len=int(arrays["seq_len"]))


def evaluate_perplexity(
    model: torch.nn.Module,
    tokens: np.ndarray,
    buckets: FrequencyBuckets,
    *,
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    weighting: str = "mile",
    sigma: float = 1.0,
    gamma: float = 1.0,
    return_blocks: bool = False,
) -> dict | tuple[dict, BlockSums]:
    """Perplexity, per-bucket perplexity, entropy/weight statistics and calibration of ``model`` on ``tokens``.

    Args:
        model: a Hugging Face causal LM (e.g. ``LlamaForCausalLM``), already on ``device``.
        tokens: (L,) held-out token ids (e.g. the ``val`` split).
        buckets: frequency buckets from the training counts (V entries, V = the data's vocabulary size).
        seq_len: window length T, at most the model's context.
        max_tokens: evaluate only the first ``max_tokens`` predicted positions (None = all).
        weighting, sigma, gamma: the loss the model was trained with (for the weight statistics).

    Returns:
        The dict of :func:`summarize_token_statistics` plus ``"windows"`` (seq_len, number of tokens) and ``ce_sum``
        (the exact sum of ``ce`` over the positions, :meth:`BlockSums.totals`) in ``overall`` and every bucket;
        with ``return_blocks``, ``(that dict, the BlockSums)``.
    """
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
        tokens = tokens[: max_tokens + 1]
    stats = collect_token_statistics(model, tokens, seq_len=seq_len, batch_size=batch_size, device=device,
                                     weighting=weighting, gamma=gamma, sigma=sigma)
    result = summarize_token_statistics(stats, buckets, weighting=weighting, sigma=sigma, gamma=gamma)
    result["windows"] = {"seq_len": seq_len, "num_predicted_tokens": int(len(stats["ce"])),
                         "num_windows": math.ceil(len(stats["ce"]) / seq_len)}
    blocks = block_sums(stats, buckets, seq_len)
    sums, _ = blocks.totals()
    for bucket, total in zip(result["buckets"], sums, strict=True):
        bucket["ce_sum"] = total
    result["overall"]["ce_sum"] = math.fsum(blocks.ce_sum.ravel().tolist())
    return (result, blocks) if return_blocks else result
