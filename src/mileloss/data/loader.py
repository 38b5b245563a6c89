"""Batches of token windows for training (shuffled, resumable, DDP-aware) and evaluation (sequential).

A split of N tokens is cut into ``W = (N - 1) // seq_len`` windows of ``seq_len + 1`` tokens starting at
``0, seq_len, 2 * seq_len, ...``: consecutive windows share one boundary token, so every token but the
first is a target exactly once per epoch. A window gives ``input_ids = window[:-1]`` and
``labels = window[1:]`` (already shifted: ``labels[:, t]`` is the token after ``input_ids[:, t]``).

Training order: epoch e visits the windows in the permutation drawn by ``np.random.default_rng((seed, e))``.
A *global* batch is the next ``batch_size * world_size`` windows of that order, and rank r takes rows
``[r * batch_size, (r + 1) * batch_size)``; so the windows seen depend only on the global batch size,
not on how it is spread over ranks (2 ranks x 4 see exactly what 1 rank x 8 sees). A global batch that
runs past the end of an epoch continues with the next epoch's permutation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from mileloss.data.shards import as_manifest, read_split
from mileloss.errors import LoaderStateError, SplitTooShortError


def _num_windows(num_tokens: int, seq_len: int, split: str, manifest) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if num_tokens < seq_len + 1:
        raise SplitTooShortError(
            f"split {split!r} of {manifest.path} has {num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    return (num_tokens - 1) // seq_len


def _windows(tokens, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows ``tokens[s : s + length]`` for each start, as int64 (B, length)."""
    out = np.empty((len(starts), length), dtype=np.int64)
    for row, start in enumerate(starts):
        out[row] = tokens[int(start) : int(start) + length]
    return out


class TokenBatchLoader:
    """Shuffled training batches from a split, identical across world sizes and across resumes.

    Args:
        data_dir_or_manifest: a data directory or a loaded ``ShardManifest``.
        split: ``"train"`` or ``"val"``.
        batch_size: windows per rank per batch.
        seq_len: tokens per row of ``input_ids``.
        seed: seeds the per-epoch permutations.
        rank, world_size: this process's slice of the global batch (DDP).

    Raises:
        SplitTooShortError: the split has fewer than ``seq_len + 1`` tokens.

    >>> loader = TokenBatchLoader("data/shakespeare", batch_size=8, seq_len=256)   # doctest: +SKIP
    >>> input_ids, labels = loader.next_batch()       # LongTensor (8, 256) each   # doctest: +SKIP
    >>> state = loader.state_dict()                   # {"epoch": 0, "position": 8, ...}  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir_or_manifest,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.manifest = as_manifest(data_dir_or_manifest)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.tokens = read_split(self.manifest, split)
        self.num_windows = _num_windows(len(self.tokens), seq_len, split, self.manifest)
        self.epoch, self.position = 0, 0  # position: windows of this epoch already handed out (globally)
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def tokens_per_batch(self) -> int:
        """Tokens of ``input_ids`` per rank per batch."""
        return self.batch_size * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def _next_window_indices(self) -> np.ndarray:
        """The next global batch of window indices; advances (epoch, position)."""
        taken: list[np.ndarray] = []
        needed = self.global_batch_size
        while needed:
            order = self._permutation(self.epoch)
            chunk = order[self.position : self.position + needed]
            taken.append(chunk)
            needed -= len(chunk)
            self.position += len(chunk)
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(taken)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, each ``torch.LongTensor (batch_size, seq_len)``, for this rank."""
        indices = self._next_window_indices()
        mine = indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = torch.from_numpy(_windows(self.tokens, mine * self.seq_len, self.seq_len + 1))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Where the loader stands: restore it with ``load_state_dict`` to get the same next batches."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "split": self.split,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the world size may differ if the global position is still valid.

        Raises:
            LoaderStateError: the state was saved for another split, seed, seq_len or data.
        """
        for key in ("seed", "seq_len", "num_windows", "split"):
            if key in state and state[key] != getattr(self, key):
                raise LoaderStateError(
                    f"loader state has {key}={state[key]!r}, but this loader has {key}={getattr(self, key)!r}"
                )
        if not 0 <= int(state["position"]) < self.num_windows:
            raise LoaderStateError(f"loader state position {state['position']} outside {self.num_windows} windows")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def iter_token_windows(
    tokens, seq_len: int, batch_size: int, *, tail: str = "pad", pad_id: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sequential, non-overlapping windows over a 1-D token array: the one window iterator of the package.

    Windows start at ``0, seq_len, 2 * seq_len, ...`` as in training, in order, ``batch_size`` per batch. The
    ``W = (L - 1) // seq_len`` full windows predict ``W * seq_len`` tokens; the ``tail`` option says what
    happens to the targets after them:

    - ``"pad"``: one more row of width ``seq_len``, ``pad_id`` in the inputs and ``-100`` (ignore) in the
      targets after its last real position, appended to the last batch (fixed shapes, e.g. for DDP);
    - ``"short"``: one more window of its own width ``< seq_len``, alone in a final batch (no padding);
    - ``"drop"``: nothing; the tail's targets are not predicted.

    With ``"pad"`` or ``"short"``, every token but the first is a target exactly once.

    Yields:
        ``(inputs, targets)``, int64 ``(rows, width)`` arrays; ``targets[:, t]`` is the token after ``inputs[:, t]``.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if tail not in ("pad", "short", "drop"):
        raise ValueError(f"tail must be 'pad', 'short' or 'drop', got {tail!r}")
    num_tokens = len(tokens)
    num_windows = max(num_tokens - 1, 0) // seq_len
    tail_tokens = np.asarray(tokens[num_windows * seq_len : num_tokens], dtype=np.int64)  # its first is an input
    has_tail = tail != "drop" and len(tail_tokens) > 1
    padded_rows = num_windows + (1 if has_tail and tail == "pad" else 0)
    for first in range(0, padded_rows, batch_size):
        rows = np.arange(first, min(first + batch_size, padded_rows))
        full = rows[rows < num_windows]
        windows = _windows(tokens, full * seq_len, seq_len + 1)
        inputs, targets = windows[:, :-1], windows[:, 1:]
        if len(full) < len(rows):  # the padded tail row
            pad_inputs = np.full((1, seq_len), pad_id, dtype=np.int64)
            pad_targets = np.full((1, seq_len), -100, dtype=np.int64)
            pad_inputs[0, : len(tail_tokens) - 1] = tail_tokens[:-1]
            pad_targets[0, : len(tail_tokens) - 1] = tail_tokens[1:]
            inputs, targets = np.concatenate([inputs, pad_inputs]), np.concatenate([targets, pad_targets])
        yield np.ascontiguousarray(inputs), np.ascontiguousarray(targets)
    if has_tail and tail == "short":
        yield tail_tokens[None, :-1], tail_tokens[None, 1:]


def iter_eval_batches(
    data_dir_or_manifest,
    split: str = "val",
    batch_size: int = 8,
    seq_len: int = 256,
    max_batches: int | None = None,
    pad_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`iter_token_windows` over a split, as tensors, for validation during training.

    With ``pad_last``, the tokens left after the last full window form one more row, padded with eos in
    ``input_ids`` and ``-100`` (ignore) in ``labels``, so every token but the first is predicted exactly once.

    Yields:
        ``(input_ids, labels)``, ``torch.LongTensor (rows, seq_len)`` each.

    Raises:
        SplitTooShortError: the split has fewer than ``seq_len + 1`` tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest = as_manifest(data_dir_or_manifest)
    tokens = read_split(manifest, split)
    _num_windows(len(tokens), seq_len, split, manifest)
    windows = iter_token_windows(tokens, seq_len, batch_size, tail="pad" if pad_last else "drop",
                                 pad_id=manifest.eos_token_id)
    for batch_index, (input_ids, labels) in enumerate(windows):
        if max_batches is not None and batch_index >= max_batches:
            return
        yield torch.from_numpy(input_ids), torch.from_numpy(labels)
