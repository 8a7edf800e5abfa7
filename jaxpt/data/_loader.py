"""Loader: (B, T+1) token windows from memory-mapped shards, in a seeded, resumable order.

A split's shards are read as one token stream of N tokens (the manifest's `max_tokens` may
keep only a first part of it). Each epoch draws a shift in [0, T) and a permutation of the
W = (N - 1) // T - 1 windows starting at shift + k*T, both from an RNG seeded by (seed, epoch);
step s of the epoch is windows s*B ... s*B + B - 1 of that order. The loader holds no position:
`next_batch(state)` returns the batch `state` points at and the state after it, so the state a
checkpoint stores resumes exactly. The state records the N of its epoch: a run resumed on
data that has grown since (a longer run extended its cache) finishes that epoch as it began,
and the next epoch covers all N of this loader, as does an epoch not begun (step 0: the state
a finished run ends on, resumed with more steps). The state also records a digest of the N
tokens it indexes (`data`: runs of tokens spread over them), so a state is refused by a loader
of other data, however its path is spelled. The state is global (the same on every
process); `rows` picks the rows of each global batch this process reads.

Chat data (`Manifest.row_tokens` = T + 1) is read by whole rows, one conversation each: the
windows are the rows (no shift), W = N // (T + 1), and each batch is a `MaskedBatch` that
carries the rows' loss mask.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from jaxpt.data._shards import Manifest, load_manifest
from jaxpt.errors import DataError

LoaderState = dict  # {"seed", "epoch", "step", "batch_size", "seq_len", "tokens"}: ints; "data"

_DIGEST_RUNS, _DIGEST_RUN_TOKENS = 16, 64  # what `Loader.digest` reads of a split


class MaskedBatch(NamedTuple):
    """A batch of chat data: windows and their loss mask (1 where the token is trained on)."""

    tokens: np.ndarray  # (R, T + 1) int32
    loss_mask: np.ndarray  # (R, T + 1) int32


class TokenNeed(NamedTuple):
    """The tokens a run reads from each split."""

    val: int  # the evaluation's batches, read from the start of the val split
    train: int  # the training steps' batches, in one epoch
    first_step: int  # the fewest training tokens a run starts on: its first step's batch


def tokens_needed(steps: int, batch_size: int, seq_len: int, eval_batches: int) -> TokenNeed:
    """The fewest tokens for `steps` training batches in one epoch (no window read twice) and
    `eval_batches` validation batches, of `batch_size` windows of `seq_len` + 1 tokens."""

    def train_tokens(steps: int) -> int:
        return (steps * batch_size + 1) * seq_len + 1  # W = (N - 1) // T - 1 = steps * B

    val = max(eval_batches, 1) * batch_size * seq_len + 1  # (N - 1) // T // B = eval_batches
    return TokenNeed(val=val, train=train_tokens(steps), first_step=train_tokens(min(steps, 1)))


class Loader:
    """Batches of `batch_size` windows of `seq_len + 1` tokens from one split of prepared data."""

    def __init__(
        self,
        data: Manifest | str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        rows: Sequence[int] | None = None,
    ) -> None:
        """
        Args:
            data: a manifest, or a prepared data directory.
            split: "train" or "val".
            batch_size: B, the global batch size in sequences.
            seq_len: T; each window holds T + 1 tokens (inputs [:-1], targets [1:]).
            rows: the rows of each global batch this process reads (`process_rows`); all of
                them by default.
        """
        self.manifest = data if isinstance(data, Manifest) else load_manifest(data)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= batch_size):
            got = f"{self.rows.min()}..{self.rows.max()}"
            raise DataError(f"rows must lie in [0, batch_size={batch_size}), got {got}")
        self.by_rows = self.manifest.row_tokens > 0  # chat data: whole rows, with a loss mask
        if self.by_rows and self.manifest.row_tokens != seq_len + 1:
            raise DataError(
                f"{self.manifest.directory} holds conversations in rows of "
                f"{self.manifest.row_tokens} tokens, for model.block_size="
                f"{self.manifest.row_tokens - 1}, but model.block_size is {seq_len}; prepare "
                f"the data again with --block_size={seq_len}, or set model.block_size to match"
            )
        shards = self.manifest.split(split)
        if not shards:
            raise DataError(missing_split(self.manifest, split))
        self._shards = [self.manifest.open(s) for s in shards]
        self._masks = [self.manifest.open_mask(s) for s in shards] if self.by_rows else []
        self._starts = np.cumsum([0] + [s.tokens for s in shards])  # (S + 1,) stream offsets
        self.tokens = self.manifest.tokens(split)  # N, within the manifest's max_tokens
        self.windows = _epoch_windows(self.tokens, seq_len, self.by_rows)  # W, per epoch
        self.steps_per_epoch = self.windows // batch_size
        self._order_cache: dict[tuple[int, int, int], tuple[int, np.ndarray]] = {}
        self._digests: dict[int, str] = {}

    def init_state(self, seed: int = 0) -> LoaderState:
        """The state of a loader at the first step of epoch 0, for `seed`."""
        check_batches(self.manifest, self.split, self.batch_size, self.seq_len)
        state = {"seed": seed, "epoch": 0, "step": 0, **self._shape(), "tokens": self.tokens}
        return {**state, "data": self.digest(self.tokens)}

    def next_batch(self, state: LoaderState) -> tuple[np.ndarray | MaskedBatch, LoaderState]:
        """The batch at `state`: this process's rows, (len(rows), T + 1) int32 (a `MaskedBatch`
        of such arrays for chat data); the next state."""
        self._check(state)
        # an epoch not begun (a finished run's last state) covers all of this loader's tokens
        tokens = state["tokens"] if state["step"] else self.tokens
        windows = _epoch_windows(tokens, self.seq_len, self.by_rows)
        shift, order = self._epoch_order(state["seed"], state["epoch"], windows)
        batch = self._read_windows(
            shift + order[state["step"] * self.batch_size + self.rows] * self._stride
        )
        step, epoch = state["step"] + 1, state["epoch"]
        if step == windows // self.batch_size:
            step, epoch, tokens = 0, epoch + 1, self.tokens
        return batch, {
            **state,
            "epoch": epoch,
            "step": step,
            "tokens": tokens,
            "data": self.digest(tokens),
        }

    def eval_batches(self, num_batches: int | None = None) -> Iterator[np.ndarray | MaskedBatch]:
        """The first `num_batches` batches (default: all) of windows k*T (chat data: rows) in
        stream order.

        Deterministic: the same batches on every call, as `next_batch` returns them.
        """
        num_batches = self.check_eval(num_batches)
        for b in range(num_batches):
            yield self._read_windows((b * self.batch_size + self.rows) * self._stride)

    def holds(self, state: LoaderState) -> bool:
        """Whether this split holds the data `state` indexes: at least its `tokens`, and the
        first `tokens` alike (`digest`; a state saved before the digest was recorded has none
        to compare)."""
        if not 0 < state["tokens"] <= self._starts[-1]:
            return False
        return state.get("data") in (None, self.digest(state["tokens"]))

    def digest(self, tokens: int) -> str:
        """What identifies the split's first `tokens` tokens (their values, whatever the path,
        dtype or shards hold them): a hex digest of 16 runs of 64 tokens spread evenly over
        them, the first and last included."""
        if tokens not in self._digests:
            length = min(_DIGEST_RUN_TOKENS, tokens)
            starts = np.linspace(0, tokens - length, _DIGEST_RUNS).astype(np.int64)
            runs = [self._read(self._shards, int(s), length).astype(np.int64) for s in starts]
            self._digests[tokens] = hashlib.sha256(np.concatenate(runs).tobytes()).hexdigest()[:16]
        return self._digests[tokens]

    def check_eval(self, num_batches: int | None = None) -> int:
        """The number of evaluation batches (default: all there are); raises DataError when
        the split holds fewer than ``num_batches`` (or none)."""
        held = check_batches(
            self.manifest, self.split, self.batch_size, self.seq_len, eval_batches=num_batches or 1
        )
        return held if num_batches is None else num_batches

    @property
    def _stride(self) -> int:
        """Tokens from one window's start to the next: T (chat data: a row, T + 1)."""
        return self.seq_len + 1 if self.by_rows else self.seq_len

    def _shape(self) -> dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len}

    def _check(self, state: LoaderState) -> None:
        saved = {k: state.get(k) for k in self._shape()}
        if saved != self._shape():
            raise DataError(
                f"the loader state was saved for {saved} but this loader has {self._shape()}; "
                "resume with the same data, batch size and sequence length"
            )
        if not self.holds(state):
            raise DataError(
                f"the loader state reads the first {state['tokens']} tokens of other data than "
                f"the {self.split!r} split of {self.manifest.directory} ({self._starts[-1]} "
                "tokens); resume with the data the run started on"
            )
        steps = _epoch_windows(state["tokens"], self.seq_len, self.by_rows) // self.batch_size
        if not 0 <= state["step"] < steps:
            raise DataError(f"loader state step {state['step']} is outside its epoch [0, {steps})")

    def _epoch_order(self, seed: int, epoch: int, windows: int) -> tuple[int, np.ndarray]:
        """(shift, permutation (W,)) of an epoch of `windows`; the current one is cached."""
        key = (seed, epoch, windows)
        if key not in self._order_cache:
            rng = np.random.default_rng([seed, epoch])
            shift = int(rng.integers(1 if self.by_rows else self.seq_len))
            self._order_cache = {key: (shift, rng.permutation(windows))}
        return self._order_cache[key]

    def _read_windows(self, starts: np.ndarray) -> np.ndarray | MaskedBatch:
        """Windows of T + 1 tokens at stream offsets `starts` (R,) -> (R, T + 1) int32, with
        their loss mask for chat data."""
        tokens = self._read_arrays(self._shards, starts)
        if not self.by_rows:
            return tokens
        return MaskedBatch(tokens, self._read_arrays(self._masks, starts))

    def _read_arrays(self, arrays: list[np.ndarray], starts: np.ndarray) -> np.ndarray:
        """(R, T + 1) int32 windows at `starts` of the stream the shard `arrays` make."""
        batch = np.empty((len(starts), self.seq_len + 1), np.int32)
        for row, start in enumerate(starts):
            batch[row] = self._read(arrays, int(start), self.seq_len + 1)
        return batch

    def _read(self, arrays: list[np.ndarray], start: int, length: int) -> np.ndarray:
        """Elements [start, start + length) of the shard `arrays`' stream, across shards."""
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while length > 0:
            offset = start - int(self._starts[i])
            piece = arrays[i][offset : offset + length]
            pieces.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return np.concatenate(pieces)


def missing_split(manifest: Manifest, split: str) -> str:
    """Why ``manifest``'s data has no shard of ``split`` and how to prepare data that has it."""
    if split == "val":
        return (
            f"{manifest.directory} has no 'val' shards; prepare the source again into a new "
            "directory with --val_shards=1"
        )
    total, row = manifest.tokens(), manifest.row_tokens or 1  # chat data: shards of whole rows
    lost = f"{manifest.directory} has no 'train' shards (its {total} tokens all went to the "
    if manifest.row_tokens and total < 2 * row:
        return f"{lost}'val' split, one conversation); prepare more conversations"
    return (
        f"{lost}'val' split); prepare the source again into a new directory with "
        f"--shard_tokens={max(total // row // 10, 1) * row} so that the val split is its first "
        "tenth"
    )


def _epoch_windows(tokens: int, seq_len: int, by_rows: bool) -> int:
    """W, the windows of an epoch over a split's first `tokens` tokens (one fewer than fit,
    for the epoch's shift; chat data, `by_rows`: the rows, unshifted)."""
    if by_rows:
        return tokens // (seq_len + 1)
    return max((tokens - 1) // seq_len - 1, 0)


def _eval_windows(tokens: int, seq_len: int, by_rows: bool) -> int:
    """The windows k*T (chat data, `by_rows`: rows) that fit in a split of `tokens` tokens."""
    return tokens // (seq_len + 1) if by_rows else (tokens - 1) // seq_len


def check_batches(
    manifest: Manifest,
    split: str,
    batch_size: int,
    seq_len: int,
    *,
    eval_batches: int | None = None,
) -> int:
    """The batches of `batch_size` windows of `seq_len` + 1 tokens in an epoch of `split` (with
    `eval_batches`: the batches `Loader.eval_batches` reads); raises DataError, naming the run
    config fields to change, when there are none or fewer than `eval_batches`. Allocates
    nothing per row, so a run checks a batch of any size before `process_rows` lists its
    rows. A split with no shards gets ``missing_split``'s advice, as prepare's warning."""
    if not manifest.split(split):
        raise DataError(missing_split(manifest, split))
    by_rows, tokens = manifest.row_tokens > 0, manifest.tokens(split)
    windows = (_epoch_windows if eval_batches is None else _eval_windows)(tokens, seq_len, by_rows)
    held = windows // batch_size
    wanted = eval_batches or 1
    if held >= wanted:
        return held
    # chat data's rows are as long as prepared: model.block_size must match them
    fields = "train.batch_size" if by_rows else "train.batch_size or model.block_size"
    if held:
        fields = f"eval.batches to at most {held}, or {fields}"
    batches = f"{wanted} batch(es) of {batch_size}" + (
        " (eval.batches of train.batch_size)" if eval_batches else " (train.batch_size)"
    )
    raise DataError(
        f"the {split!r} split of {manifest.directory} has {tokens} tokens, {windows} windows of "
        f"{seq_len + 1}: too few for {batches}; lower {fields}, or use more data"
    )


def process_rows(sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """The rows of a global batch of `global_shape` that this process's devices hold.

    With the loader's `rows` set to these, `to_global` assembles the global array. Processes
    whose devices hold the same rows (replicas) read the same rows.

    Args:
        sharding: the batch's `jax.sharding.Sharding`.
        global_shape: (B, T), the global batch shape.

    Returns:
        Sorted row indices (R,).
    """
    batch_size = global_shape[0]
    indices = sharding.addressable_devices_indices_map(tuple(global_shape)).values()
    rows = {r for index in indices for r in range(*index[0].indices(batch_size))}
    return np.array(sorted(rows), np.int64)


def to_global(batch: np.ndarray | MaskedBatch, sharding, batch_size: int) -> tuple:
    """Global (inputs, targets) arrays (B, T) from this process's rows (R, T + 1) of a batch;
    for a `MaskedBatch`, (inputs, targets, loss_mask), the mask of the targets. Either way
    the train and eval steps' batch arguments.

    `batch` must hold the rows `process_rows(sharding, (B, T))` in order.
    """
    import jax

    tokens = batch.tokens if isinstance(batch, MaskedBatch) else batch
    shape = (batch_size, tokens.shape[1] - 1)
    arrays = [tokens[:, :-1], tokens[:, 1:]]
    if isinstance(batch, MaskedBatch):
        arrays.append(batch.loss_mask[:, 1:])
    make = jax.make_array_from_process_local_data
    return tuple(make(sharding, np.ascontiguousarray(a), shape) for a in arrays)


def check_vocab(data: Manifest | Loader, vocab_size: int) -> None:
    """Raises DataError if the data holds a token id >= `vocab_size` (the model's)."""
    manifest = data.manifest if isinstance(data, Loader) else data
    if manifest.max_token_id >= vocab_size:
        raise DataError(
            f"the data in {manifest.directory} holds token ids up to {manifest.max_token_id} "
            f"({manifest.tokenizer['kind']} tokenizer, {manifest.vocab_size} ids) but "
            f"model.vocab_size is {vocab_size}; set model.vocab_size to at least "
            f"{manifest.vocab_size}"
        )
