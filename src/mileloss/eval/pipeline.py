"""``mileloss eval`` as one library call: frequency-bucket perplexity, then downstream benchmarks.

>>> evaluate("runs/mile", "data/shakespeare", tasks=["piqa", "arc_easy"], limit=50)   # doctest: +SKIP
{'perplexity': {...}, 'lm_eval': {...}, 'out_dir': PosixPath('runs/mile/eval')}

Writes ``OUT/blocks.npz`` (per evaluation window: per-bucket sums of cross-entropy and token counts, for the
paired intervals of ``mileloss report``), then ``OUT/perplexity.json`` (which records the sha256 of
``blocks.npz``) and (unless ``tasks`` is empty) ``OUT/lm_eval.json``; ``OUT`` defaults to ``RUN_DIR/eval``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mileloss.errors import CheckpointError, EvalArgumentError, EvalDataError, OutputFolderError
from mileloss.eval.buckets import DEFAULT_CUT_POINTS, frequency_buckets, parse_cut_points
from mileloss.eval.checkpoint import (
    Checkpoint,
    LossSettings,
    check_tokenizer_matches,
    load_model,
    model_sizes,
    resolve_checkpoint,
    run_loss_settings,
    torch_dtype,
)
from mileloss.eval.lm_eval_bridge import DEFAULT_TASKS, parse_task_list, run_lm_eval
from mileloss.eval.lm_eval_bridge import benchmark_root as find_benchmark_files
from mileloss.eval.outputs import check_output_folder, create_output_folder
from mileloss.eval.perplexity import evaluate_perplexity, write_blocks
from mileloss.run_folder import (
    BLOCKS,
    LM_EVAL,
    PERPLEXITY,
    RunFolder,
    data_identity,
    is_temp_of,
    read_json_object,
    write_atomic,
)

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "format_lm_eval_table", "format_perplexity_table"]

COMMAND = "mileloss eval"
OUTPUT_FILES = {PERPLEXITY: ("bucket_definition", "overall"), LM_EVAL: ("tasks", "checkpoint")}
"""The JSON files ``mileloss eval`` writes, and the keys that recognise one written before ``written_by`` existed."""
ZIP_MAGIC = b"PK\x03\x04"


def _count(value, flag: str, minimum: int, *, optional: bool = True) -> int | None:
    """``value`` as an int >= ``minimum`` (None allowed if ``optional``), or an :class:`EvalArgumentError`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvalArgumentError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return value


def _resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvalArgumentError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise EvalArgumentError(f"--device {device!r}: mileloss eval runs on cpu or cuda")
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise EvalArgumentError(f"--device {device!r}: no such CUDA device on this machine "
                                f"({torch.cuda.device_count()} available)")
    return str(parsed)


def _owns(entry: Path) -> bool:
    """True for a file ``mileloss eval`` wrote: one of :data:`OUTPUT_FILES` (recognised by content), ``blocks.npz``
    (a zip archive), or the temp of one."""
    if is_temp_of(entry, {*OUTPUT_FILES, BLOCKS}):
        return True
    if entry.name == BLOCKS:
        if not entry.is_file() or entry.is_symlink():
            return False
        with open(entry, "rb") as handle:
            return handle.read(4) == ZIP_MAGIC
    keys = OUTPUT_FILES.get(entry.name)
    if keys is None or not entry.is_file():
        return False
    content = read_json_object(entry)
    return content is not None and (content.get("written_by") == COMMAND or all(key in content for key in keys))


def _check_out(out: Path, flag: str, checkpoint: Checkpoint) -> None:
    """The output folder must be new, empty or hold only an earlier evaluation of this same checkpoint."""
    check_output_folder(out, COMMAND, _owns, flag=flag)
    mine = str(checkpoint.path.resolve())
    for name in OUTPUT_FILES:
        content = read_json_object(out / name) or {}
        other = content.get("checkpoint_path")
        if isinstance(other, str) and other != mine:
            raise OutputFolderError(f"{flag} {out} holds the evaluation of {other}, not of {mine}; give another "
                                    f"folder, nothing there is overwritten")


def _write_json(path: Path, payload: dict) -> Path:
    return write_atomic(path, json.dumps({"written_by": COMMAND, **payload}, indent=2) + "\n")


def evaluate(
    path: str | Path,
    data_dir: str | Path | None = None,
    *,
    buckets: str | Sequence[float] = DEFAULT_CUT_POINTS,
    max_tokens: int | None = None,
    tasks: str | Sequence[str] | None = DEFAULT_TASKS,
    num_fewshot: int = 0,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    benchmark_root: str | Path | None = None,
) -> dict:
    """Evaluate a run folder or checkpoint: per-bucket perplexity and (optionally) lm-eval benchmarks.

    Args:
        path: a run folder (its ``final/`` is used) or any Hugging Face checkpoint folder with a tokenizer.
        data_dir: the ``mileloss data`` directory the model was trained on; defaults to the ``data_dir`` in
            ``final/mileloss_run.json``.
        buckets: cumulative-occurrence cut points, ``"80,95"`` by default (high / medium / low).
        max_tokens: cap on evaluated validation tokens (None = the whole split).
        tasks: benchmark names (see :data:`~mileloss.eval.lm_eval_bridge.TASKS`); ``"none"`` / ``[]`` skips them.
        num_fewshot: in-context examples for the benchmarks.
        limit: documents per benchmark task (None = all).
        out_dir: where to write the JSON files (default ``RUN_DIR/eval``): a new or empty folder, or one holding
            an earlier evaluation of the same checkpoint (anything else is refused, never overwritten).
        seq_len: perplexity window (default: the run's training ``seq_len``, else the model context).
        batch_size: windows per forward pass (perplexity) and lm-eval batch size.
        device: ``cuda`` if available, else ``cpu``.
        dtype: model weights dtype (``float32``; ``bfloat16`` on GPU).
        cache_dir, benchmark_root: see :func:`~mileloss.eval.lm_eval_bridge.run_lm_eval`.

    The entropy, weight and calibration statistics use the loss the run was trained with (kind, gamma, sigma
    from ``final/mileloss_run.json`` and ``config.yaml``); ``perplexity.json`` records them under
    ``loss_weight`` and the identity of the evaluation data under ``data``.

    Returns:
        ``{"perplexity": dict, "lm_eval": dict | None, "out_dir": Path}``.

    Raises:
        EvalArgumentError, CheckpointError, TokenizerMismatchError, EvalDataError, BucketSpecError,
        BenchmarkFileError, UnknownTaskError, OutputFolderError: with the folder, file or flag at fault in the
        message. Every argument and the output folder are checked before the model is loaded.
    """
    cut_points = parse_cut_points(buckets)
    task_names = parse_task_list(tasks)
    max_tokens = _count(max_tokens, "--max-tokens", 1)
    seq_len = _count(seq_len, "--seq-len", 1)
    batch_size = _count(batch_size, "--batch-size", 1, optional=False)
    num_fewshot = _count(num_fewshot, "--num-fewshot", 0, optional=False)
    limit = _count(limit, "--limit", 1)
    torch_dtype(dtype)
    device = _resolve_device(device)
    if task_names and benchmark_root is None:
        find_benchmark_files(cache_dir)  # fetched (or found) now, not after the perplexity pass

    checkpoint = resolve_checkpoint(path)
    model_sizes(checkpoint)  # a malformed config.json is named here, before anything loads it
    loss = run_loss_settings(checkpoint)
    out = Path(out_dir) if out_dir is not None else RunFolder(checkpoint.run_dir or checkpoint.path).eval_dir
    flag = "--out" if out_dir is not None else "output folder"
    _check_out(out, flag, checkpoint)
    with _new_folder_removed_on_failure(out, flag):
        return _evaluate(checkpoint, loss, data_dir, out, cut_points, task_names, max_tokens=max_tokens,
                         num_fewshot=num_fewshot, limit=limit, seq_len=seq_len, batch_size=batch_size, device=device,
                         dtype=dtype, cache_dir=cache_dir, benchmark_root=benchmark_root)


@contextlib.contextmanager
def _new_folder_removed_on_failure(out: Path, flag: str) -> Iterator[None]:
    """Create ``out`` now (an unwritable folder fails before the evaluation, not after it); if the body fails,
    remove it again when this call created it and it is still empty."""
    created = not out.exists()
    create_output_folder(out, flag=flag)
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only ever succeeds on an empty folder
        raise


def _evaluate(checkpoint: Checkpoint, loss: LossSettings, data_dir: str | Path | None, out: Path,
              cut_points: tuple[float, ...], task_names: list[str], **options) -> dict:
    """:func:`evaluate` once its arguments and output folder are checked (``options``: its keyword arguments)."""
    from mileloss.data import load_manifest, read_split

    max_tokens, seq_len, batch_size, device, dtype = (options[key] for key in (
        "max_tokens", "seq_len", "batch_size", "device", "dtype"))
    if data_dir is None:
        data_dir = checkpoint.run_info.get("data_dir")
        if not isinstance(data_dir, str) or not data_dir:
            raise EvalDataError(f"{checkpoint.path}: no mileloss_run.json with a data_dir; pass --data DATA_DIR")
    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").is_file():
        raise EvalDataError(f"{data_dir}: no manifest.json (create the data directory with `mileloss data`)")
    manifest = load_manifest(data_dir)
    check_tokenizer_matches(checkpoint.path, manifest.tokenizer_dir)
    frequency = frequency_buckets(manifest.token_counts(), cut_points)

    vocab_size, context = model_sizes(checkpoint)  # checked before the weights load
    if vocab_size is not None and vocab_size < manifest.vocab_size:
        raise EvalDataError(f"{checkpoint.path}: model vocab_size {vocab_size} is smaller than the data's "
                            f"{manifest.vocab_size} ({data_dir / 'manifest.json'})")
    if seq_len is None:
        run_model = checkpoint.run_info.get("model")
        seq_len = (run_model.get("seq_len") if isinstance(run_model, dict) else None) or context
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise CheckpointError(f"{checkpoint.path}: no usable window length (model.seq_len in "
                                  f"mileloss_run.json or max_position_embeddings: {seq_len!r}); pass --seq-len")
    if context is not None and seq_len > context:
        raise EvalArgumentError(f"--seq-len {seq_len} exceeds the model's context of {context} positions")
    model = load_model(checkpoint, device=device, dtype=dtype)
    tokens = read_split(manifest, "val")
    started = time.perf_counter()
    logger.info("perplexity of %s on %s (%d val tokens, window %d; %s weight %s, gamma %g, sigma %g)",
                checkpoint.path, data_dir, len(tokens), seq_len, loss.kind, loss.formula, loss.gamma, loss.sigma)
    result, blocks = evaluate_perplexity(model, tokens, frequency, seq_len=int(seq_len), batch_size=batch_size,
                                         max_tokens=max_tokens, device=device, weighting=loss.kind, gamma=loss.gamma,
                                         sigma=loss.sigma, return_blocks=True)
    del model
    blocks_bytes = write_blocks(blocks)
    logger.info("wrote %s", write_atomic(out / BLOCKS, blocks_bytes))
    result["blocks"] = {"file": BLOCKS, "sha256": hashlib.sha256(blocks_bytes).hexdigest(),
                        "num_blocks": blocks.num_blocks, "block": "evaluation window", "seq_len": blocks.seq_len}
    result = {
        "checkpoint": str(checkpoint.path),
        "checkpoint_path": str(checkpoint.path.resolve()),
        "run_dir": str(checkpoint.run_dir) if checkpoint.run_dir else None,
        "data_dir": str(data_dir),
        "data": data_identity(data_dir),
        "max_tokens": max_tokens,
        "bucket_definition": frequency.to_dict(),
        **result,
        "loss_weight": loss.to_dict(),
        "elapsed_seconds": round(time.perf_counter() - started, 2),
    }
    logger.info("wrote %s", _write_json(out / PERPLEXITY, result))

    lm_eval_result = None
    if task_names:
        started = time.perf_counter()
        lm_eval_result = run_lm_eval(checkpoint.path, task_names, num_fewshot=options["num_fewshot"],
                                     limit=options["limit"], batch_size=batch_size, device=device, dtype=dtype,
                                     cache_dir=options["cache_dir"], root=options["benchmark_root"])
        lm_eval_result = {"checkpoint": str(checkpoint.path), "checkpoint_path": str(checkpoint.path.resolve()),
                          **lm_eval_result, "elapsed_seconds": round(time.perf_counter() - started, 2)}
        logger.info("wrote %s", _write_json(out / LM_EVAL, lm_eval_result))
    return {"perplexity": result, "lm_eval": lm_eval_result, "out_dir": out}


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_perplexity_table(result: dict) -> str:
    """Plain-text table of ``perplexity.json``: the bucket definition, then one row per bucket and overall."""
    cuts = ", ".join(f"{c:g}%" for c in result["bucket_cut_points"])
    lines = [f"buckets: cumulative training-occurrence cuts at {cuts}"]
    header = f"{'bucket':<22}{'types':>8}{'train %':>9}{'tokens':>10}{'loss':>9}{'ppl':>11}{'acc':>8}{'ECE':>8}" \
             f"{'H mean':>8}{'w mean':>8}"
    lines += [header, "-" * len(header)]
    rows = [(b["label"], b["num_types"], 100 * b["share_of_occurrences"], b) for b in result["buckets"]]
    rows.append(("overall", sum(b["num_types"] for b in result["buckets"]), 100.0, result["overall"]))
    for label, types, share, row in rows:
        lines.append(
            f"{label:<22}{types:>8}{share:>9.2f}{row['num_tokens']:>10}{_fmt(row['loss'], '.4f'):>9}"
            f"{_fmt(row['ppl'], '.3f'):>11}{_fmt(row['accuracy'], '.3f'):>8}{_fmt(row['ece'], '.4f'):>8}"
            f"{_fmt(row['entropy']['mean'], '.3f'):>8}{_fmt(row['weight']['mean'], '.3f'):>8}"
        )
    return "\n".join(lines)


def format_lm_eval_table(result: dict) -> str:
    """Plain-text table of ``lm_eval.json``: task, metric, value ± stderr, documents, shots."""
    lines = [f"{'task':<16}{'metric':<13}{'value':>8}{'stderr':>9}{'n':>7}{'shots':>7}"]
    for name, row in result["tasks"].items():
        lines.append(f"{name:<16}{row['metric']:<13}{_fmt(row['value'], '.4f'):>8}{_fmt(row['stderr'], '.4f'):>9}"
                     f"{row['n']:>7}{row['num_fewshot']:>7}")
    if result.get("commonsense_average") is not None:
        lines.append(f"{'average (8 common-sense tasks)':<44}{result['commonsense_average']:.4f}")
    return "\n".join(lines)
