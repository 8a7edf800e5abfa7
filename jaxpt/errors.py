"""The errors jaxpt raises for bad input. Each carries one sentence naming what is wrong (the
field or file, the value, the rule) and what to do; ``launch.py`` prints it without a traceback.
A command stopped by Ctrl-C ends likewise, with one line (``exit_interrupted``).
"""

import contextlib
import difflib
import math
import numbers
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

INTERRUPTED = 128 + signal.SIGINT  # a command's exit status after Ctrl-C: the shell's for it


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field, the value and the rule."""


class DataError(ValueError):
    """Data that cannot be used as given (empty, corrupt, or inconsistent with the model)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset, shard or tokenizer file that does not exist."""


def sentence(error: BaseException) -> str:
    """``error``'s message as the sentence a command ends with: closed by a full stop (messages
    of the data layer are clauses, which other sentences quote)."""
    text = str(error).rstrip()
    return text if text.endswith((".", "?", "!")) else f"{text}."


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (at most 200 characters, without a closing full
    stop; its type's name when empty), to quote an error inside one of jaxpt's sentences."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return line.removesuffix(".")


def check_range(
    name: str,
    value,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    integer: bool = False,
    note: str = "",
) -> None:
    """Raises ConfigError unless ``value`` is a finite number (an integer when ``integer``;
    never a bool) within the bounds given, e.g. ``check_range("train.b1", b1, at_least=0,
    below=1)``; the message names ``name``, the value and the rule, then ``note``."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (at_least is None or value >= at_least) and (above is None or value > above)
    ok = ok and (at_most is None or value <= at_most) and (below is None or value < below)
    if ok:
        return
    low = at_least if at_least is not None else above
    high = at_most if at_most is not None else below
    if low is not None and high is not None:
        opening, closing = "[" if at_least is not None else "(", "]" if at_most is not None else ")"
        bounds = f" in {opening}{low}, {high}{closing}"
    elif low is not None:
        bounds = f" {'>=' if at_least is not None else '>'} {low}"
    elif high is not None:
        bounds = f" {'<=' if at_most is not None else '<'} {high}"
    else:
        bounds = ""
    number = "an integer" if integer else "a finite number"
    raise ConfigError(f"{name}={value!r} must be {number}{bounds}{note}.")


def did_you_mean(name: str, known: Sequence[str], elsewhere: Sequence[str] = ()) -> str:
    """The end of a sentence about an unknown ``name``: ``"did you mean steps?"`` naming
    ``elsewhere`` (e.g. ``["model.block_size"]``, where a field of that name lives) then the
    closest of ``known``, up to three (``"a, b or c"``); when there are none, ``"the fields
    are a, b, c."``."""
    close = [*elsewhere, *difflib.get_close_matches(name, known, n=3)][:3]
    if not close:
        return f"the fields are {', '.join(known)}."
    *first, last = close
    return f"did you mean {', '.join(first) + ' or ' if first else ''}{last}?"


def exit_interrupted(line: str, *, at_once: bool = False) -> NoReturn:
    """Ends a command stopped by Ctrl-C (a KeyboardInterrupt it caught): ``line`` (``launch.py:
    interrupted (SIGINT); ...``) on stderr, exit status ``INTERRUPTED``. ``at_once`` ends the
    process without the interpreter's finalization (its own cleanup ran as the exception
    unwound): Ctrl-C may have left XLA compiling on its own threads, which crash when
    finalization tears down the backend under them."""
    print(line, file=sys.stderr, flush=True)
    if at_once:
        sys.stdout.flush()
        os._exit(INTERRUPTED)
    sys.exit(INTERRUPTED)


@contextlib.contextmanager
def exit_at_once_on_interrupt(line: str) -> Iterator[None]:
    """Within it, Ctrl-C ends the command at once, ``line`` on stderr and exit status
    ``INTERRUPTED``, instead of raising KeyboardInterrupt: raised while a command's modules
    import (jax's, for seconds), that surfaces as an extension's ImportError, or aborts the
    process from C++, with a traceback either way. A SIGINT that the process ignores (a shell's
    background job) stays ignored."""

    def stop(signum, frame) -> NoReturn:
        print(line, file=sys.stderr, flush=True)
        os._exit(INTERRUPTED)  # nothing to unwind: importing writes nothing

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
