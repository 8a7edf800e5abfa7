"""jaxpt's Pallas kernels against XLA at the shapes of a train step, forward and forward+backward.

    python3 bench/kernels.py --out=$OUT                       # on a GPU
    python3 bench/kernels.py --out=$OUT --sweep=norm,loss     # and the kernels' tilings

Each row is the median of ``--steps`` jitted calls after a warm-up. The residual-stream norm
(GPT-2 16 x 1024 x 768 LayerNorm, smollm 8 x 2048 x 576 RMSNorm, bfloat16): one call applies
``CHAIN`` norms one after another and the row is per norm (a single norm would time the
dispatch). The loss: GPT-2's cross-entropy over 16 x 1024 x 50304 bfloat16 logits.
``--sweep`` times the norm kernel over tile sizes, warps and backward programs, and the loss
kernel over vocabulary chunks, tile sizes and warps. Prints a table last; writes
kernels.json to --out.
"""

import itertools
import statistics
import time

import _report  # bench/_report.py, beside this script
import jax
import jax.numpy as jnp
from absl import app, flags

from jaxpt import nn
from jaxpt.nn import _loss_pallas, _norm_pallas

flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_integer("steps", 50, "Timed calls.", lower_bound=1)
flags.DEFINE_list("sweep", [], "Also time these kernels' tilings: norm, loss.")
flags.register_validator(
    "sweep",
    lambda names: set(names) <= {"norm", "loss"},
    message="--sweep names kernels among norm and loss, e.g. --sweep=norm,loss",
)

CHAIN = 25  # the norms of a 12-layer model
LOGITS = (16, 1024, 50304)
LOSS_TILINGS = (
    (2048, 8192, 8),
    (2048, 2048, 4),
    (2048, 4096, 4),
    (1024, 2048, 4),
    (1024, 1024, 4),
    (1024, 2048, 2),
    (512, 1024, 4),
    (512, 2048, 4),
)
NORMS = (  # (name, shape, norm)
    ("gpt layernorm", (16, 1024, 768), "layernorm"),
    ("smollm rmsnorm", (8, 2048, 576), "rmsnorm"),
)


def median_ms(fn, *args, steps: int) -> float:
    """Median milliseconds of ``fn(*args)`` (jitted), after two untimed calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def norm_row(name: str, shape, norm: str, kernels: str, steps: int) -> dict:
    """Forward and forward+backward milliseconds of one norm, one way."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    params = nn.NORMS[norm].init(shape[-1], jnp.bfloat16)
    g = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)

    def forward(params, x):
        for _ in range(CHAIN):
            x = nn.NORMS[norm].apply(params, x, 1e-5, kernels=kernels)
        return x

    def backward(params, x, g):
        return jax.vjp(forward, params, x)[1](g)

    return dict(
        name=name,
        kernels=kernels,
        forward_ms=median_ms(jax.jit(forward), params, x, steps=steps) / CHAIN,
        forward_backward_ms=median_ms(jax.jit(backward), params, x, g, steps=steps) / CHAIN,
    )


def loss_row(kernels: str, steps: int) -> dict:
    """Forward and forward+backward milliseconds of GPT-2's loss, one way."""
    logits = jax.random.normal(jax.random.key(0), LOGITS, jnp.bfloat16) * 2
    targets = jax.random.randint(jax.random.key(1), LOGITS[:-1], 0, LOGITS[-1])

    def loss(logits):
        return nn.cross_entropy(logits, targets, kernels=kernels)

    return dict(
        name="gpt cross-entropy",
        kernels=kernels,
        forward_ms=median_ms(jax.jit(loss), logits, steps=steps),
        forward_backward_ms=median_ms(jax.jit(jax.grad(loss)), logits, steps=steps),
    )


def loss_sweep_rows(steps: int) -> list[dict]:
    """GPT-2's loss under tilings of the kernel: (vocabulary chunk, tile, warps)."""
    rows = []
    for chunk, tile, warps in LOSS_TILINGS:
        _loss_pallas.CHUNK, _loss_pallas.TILE, _loss_pallas.NUM_WARPS = chunk, tile, warps
        row = loss_row("pallas", steps)
        rows.append({**row, "name": f"loss chunk={chunk} tile={tile} warps={warps}"})
    return rows


def norm_sweep_rows(steps: int) -> list[dict]:
    """The GPT-2 norm under every tiling of the kernel."""
    rows = []
    for tile, warps, programs in itertools.product((2048, 4096, 8192), (2, 4, 8), (264, 1024)):
        _norm_pallas.TILE, _norm_pallas.WARPS, _norm_pallas.PROGRAMS = tile, warps, programs
        row = norm_row(
            f"tile={tile} warps={warps} programs={programs}", *NORMS[0][1:], "pallas", steps
        )
        rows.append(row)
    return rows


def main(argv):
    del argv
    f = flags.FLAGS
    rows = [norm_row(*n, k, f.steps) for n in NORMS for k in ("xla", "pallas")]
    rows += [loss_row(k, f.steps) for k in ("xla", "pallas")]
    if "norm" in f.sweep:
        rows += norm_sweep_rows(f.steps)
    if "loss" in f.sweep:
        rows += loss_sweep_rows(f.steps)
    result = _report.save(f.out, "kernels", rows=rows)
    print(f"jaxpt kernels, {result['device']}, {result['date']}, ms (per norm for the norms)")
    print(f"{'what':<36} {'kernels':<8} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    for r in rows:
        fwd, bwd = r["forward_ms"], r["forward_backward_ms"]
        print(f"{r['name']:<36} {r['kernels']:<8} {fwd:>8.3f} {bwd:>11.3f}")


if __name__ == "__main__":
    app.run(main)
