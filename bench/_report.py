"""What every bench records: where and when it ran, and the JSON file it writes."""

import json
import os
import pathlib
import platform
import sys
from datetime import date

import jax
from absl import app, flags

from jaxpt.errors import ConfigError


def save(out: str, name: str, **fields) -> dict:
    """Writes ``fields`` plus the date, device, backend, host and jax version to
    ``out/name.json`` and returns the whole record."""
    result = dict(
        date=date.today().isoformat(),
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        host=platform.processor() or platform.machine(),
        jax=jax.__version__,
        **fields,
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def positive_ints(*names: str) -> None:
    """Requires the list flags ``names`` to hold one or more positive integers: another value
    ends the bench in one sentence before anything runs."""
    for name in names:
        flags.register_validator(
            name,
            lambda values: bool(values) and all(v.isdigit() and int(v) > 0 for v in values),
            message=f"--{name} takes positive integers separated by commas, e.g. --{name}=1,32",
        )


def committed(out: str, name: str) -> dict:
    """The record ``out/name.json`` a summary wrote (``bench/results`` holds the committed ones);
    a missing one ends the script in one sentence."""
    path = pathlib.Path(out) / f"{name}.json"
    if not path.is_file():
        raise SystemExit(
            f"{path} does not exist: pass --out=DIR of a {name}.json, or --runs=DIR to make one"
        )
    return json.loads(path.read_text())


def run(main) -> None:
    """``app.run(main)``, where a ConfigError (an unknown preset, a field its model has not, a
    value out of range) ends the bench in its one sentence, exit status 1, not a traceback."""

    def guarded(argv):
        try:
            return main(argv)
        except ConfigError as error:
            raise SystemExit(f"{os.path.basename(sys.argv[0])}: {error}") from None

    app.run(guarded)
