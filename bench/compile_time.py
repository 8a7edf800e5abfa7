"""Compile time of ``apply`` against depth: scanned layers keep it flat.

    uv run python bench/compile_time.py --out=bench/results

Prints a table last and writes compile_time.json to --out.
"""

import dataclasses
import time

import _report  # bench/_report.py, beside this script
import jax
import jax.numpy as jnp
from absl import flags

from jaxpt import models
from jaxpt.errors import ConfigError

flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_string("model", "gpt", "Registry name.")
flags.DEFINE_list("layers", ["2", "24"], "Depths to compile.")
_report.positive_ints("layers")
flags.DEFINE_integer("seq", 256, "Sequence length of the compiled call.", lower_bound=1)


def compile_seconds(name: str, n_layer: int, scan: bool, seq: int) -> float:
    """Seconds to lower and compile one jitted forward pass (params abstract, not allocated)."""
    model = models.get(name)
    cfg = dataclasses.replace(model.default_config(), n_layer=n_layer, scan_layers=scan)
    params = jax.eval_shape(lambda k: model.init(k, cfg), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    start = time.perf_counter()
    jax.jit(lambda p, t: model.apply(p, t, cfg)).lower(params, tokens).compile()
    return time.perf_counter() - start


def main(argv):
    del argv
    f = flags.FLAGS
    if not isinstance(models.get(f.model).default_config(), models.ModelConfig):
        raise ConfigError(
            f"--model={f.model} has no layers: compile time against depth needs a decoder "
            "preset, e.g. --model=gpt."
        )
    rows = []
    for scan in (True, False):
        for n_layer in map(int, f.layers):
            rows.append(
                dict(
                    model=f.model,
                    n_layer=n_layer,
                    scan_layers=scan,
                    compile_s=compile_seconds(f.model, n_layer, scan, f.seq),
                )
            )
    result = _report.save(
        f.out,
        "compile_time",
        rows=rows,
    )
    print(f"compile time of {f.model} apply, {result['device']}, {result['date']}")
    print(f"{'n_layer':>8} {'scan':>6} {'compile s':>10}")
    for r in rows:
        print(f"{r['n_layer']:>8} {r['scan_layers']!s:>6} {r['compile_s']:>10.2f}")


if __name__ == "__main__":
    _report.run(main)
