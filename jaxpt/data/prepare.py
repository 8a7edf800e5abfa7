"""Prepares a corpus as token shards for training.

  uv run python -m jaxpt.data.prepare --out=data/fineweb-edu   # FineWeb-Edu sample-10BT
  uv run python -m jaxpt.data.prepare --dataset=book.txt --out=data/book --shard_tokens=10000
  uv run python -m jaxpt.data.prepare --dataset=corpus/ --tokenizer=char --out=data/chars
  uv run python -m jaxpt.data.prepare --format=chat --dataset=HuggingFaceTB/smol-smoltalk \\
      --tokenizer=hf/smollm --block_size=2048 --out=data/smol-smoltalk

--format=chat reads conversations (a column of {role, content} messages) and writes one
conversation per row of block_size + 1 tokens, rendered with the tokenizer's chat template
(ChatML without one), with a loss mask on the assistant's replies.

Re-running the same command resumes an interrupted run (finished shards are kept), rewrites
a damaged shard, extends the data when --max_tokens grew, or else does nothing. --out must be
new, empty, or written by this command. See `prepare_dataset` for what each flag means. Every
error is one line, `error: <sentence>`, with exit status 1; Ctrl-C one line too, exit status 130.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging

from jaxpt.data._loader import missing_split
from jaxpt.data._prepare import (
    DEFAULT_DATASET,
    DEFAULT_SHARD_TOKENS,
    FORMATS,
    prepare_dataset,
    summary,
)
from jaxpt.errors import DataError, exit_interrupted, sentence

# Ctrl-C: progress.json records each shard written (whole or not at all), not the one filling
_INTERRUPTED = (
    "jaxpt.data.prepare: interrupted (SIGINT); --out keeps the shards it finished: run the "
    "command again to go on from them."
)

_DATASET = flags.DEFINE_string(
    "dataset", DEFAULT_DATASET, "Hugging Face hub dataset, or a local file or directory."
)
_OUT = flags.DEFINE_string("out", None, "Data directory to write.", required=True)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "gpt2", "gpt2, char, or a tokenizer.json (or a directory holding one)."
)
_CONFIG_NAME = flags.DEFINE_string(
    "config_name", None, "Hub dataset config (default: sample-10BT for FineWeb-Edu)."
)
_SPLIT = flags.DEFINE_string("split", "train", "Split to read (local files: train).")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Column holding each document's text.")
_SHARD_TOKENS = flags.DEFINE_integer("shard_tokens", DEFAULT_SHARD_TOKENS, "Tokens per shard.")
_VAL_SHARDS = flags.DEFINE_integer("val_shards", 1, "Leading shards that form the val split.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Stop after this many tokens (0: all).")
_WORKERS = flags.DEFINE_integer("workers", None, "Tokenizer processes (default: one per CPU).")
_STREAMING = flags.DEFINE_bool("streaming", True, "Read lazily instead of converting to Arrow.")
_FORMAT = flags.DEFINE_enum("format", "text", FORMATS, "text: documents; chat: conversations.")
_BLOCK_SIZE = flags.DEFINE_integer(
    "block_size", 0, "chat: the model's block size (rows of block_size + 1 tokens)."
)
_MESSAGES_FIELD = flags.DEFINE_string(
    "messages_field", "messages", "chat: column holding each conversation's messages."
)


class _PlainFormatter(std_logging.Formatter):
    """What preparation logs ("resuming ...", a warning) as the command's own lines: plain,
    a warning as ``warning: <message>``, without absl's "I1130 12:00:00.123 ... ]" prefix."""

    def format(self, record: std_logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < std_logging.WARNING else f"warning: {text}"


# the --format each format-specific flag applies to (under the other it would be ignored)
_FLAG_FORMAT = {"text_field": "text", "block_size": "chat", "messages_field": "chat"}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])!r}; pass each as --flag=value.")
    for name, format in _FLAG_FORMAT.items():
        if flags.FLAGS[name].present and _FORMAT.value != format:
            sys.exit(f"error: --{name} applies to --format={format}; leave it out.")
    logging.get_absl_handler().setFormatter(_PlainFormatter())
    # `datasets` imports torch where installed (~3 s) for every streamed source; prepare has no
    # use for torch tensors
    os.environ.setdefault("USE_TORCH", "0")
    try:
        manifest = prepare_dataset(
            _DATASET.value,
            _OUT.value,
            tokenizer=_TOKENIZER.value,
            config_name=_CONFIG_NAME.value,
            split=_SPLIT.value,
            text_field=_TEXT_FIELD.value,
            shard_tokens=_SHARD_TOKENS.value,
            val_shards=_VAL_SHARDS.value,
            max_tokens=_MAX_TOKENS.value,
            workers=_WORKERS.value,
            streaming=_STREAMING.value,
            format=_FORMAT.value,
            block_size=_BLOCK_SIZE.value,
            messages_field=_MESSAGES_FIELD.value,
        )
    except DataError as e:
        sys.exit(f"error: {sentence(e)}")
    except OSError as e:
        sys.exit(
            f"error: {e.strerror or e} ({e.filename or _OUT.value}); check the paths and free "
            "space."
        )
    except KeyboardInterrupt:
        exit_interrupted(_INTERRUPTED)
    print(summary(manifest))
    for split in ("train", "val"):  # a run reads both: say now what training would refuse
        if not manifest.split(split):
            print(f"warning: {missing_split(manifest, split)}.", file=sys.stderr)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad or missing flag as one sentence."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {str(e).rstrip('.')}; see --help.")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
