"""Decode speed: jaxpt.generate against transformers' generate on the same device.

    uv run python bench/generate.py --out=bench/results                  # CPU here
    python3 bench/generate.py --out=$OUT --dtype=bfloat16                 # on a GPU

The GPT-2 124M shape with the exact GPT-2 vocabulary (50257) and random weights; a prompt of
``--prompt`` random tokens; ``--new`` greedy tokens with no stop token (every row makes all
of them); batch 1 and 32. Weights and compute in ``--dtype``. New tokens/s = batch x new /
time of one whole generate call (prefill included), median of ``--reps`` runs after a warm-up
that compiles. The reference is transformers' ``GPT2LMHeadModel.generate(use_cache=True)``
(its dynamic cache) with the same shape, dtype and prompts' length, when torch and
transformers are importable; ``../shared/bench/ref_hf_generate.py`` times its other cache
variants. Prints a table last and writes generate.json to --out (with the flags that change
jaxpt's figure: dtype, prompt, new, scan_layers, sdpa, kernels). ``--trace=DIR`` also traces
one more jaxpt call a batch, untimed, into ``DIR/b<batch>``: ``bench/trace_gaps.py
--trace=DIR/b1`` says how much of a decoding call the GPU computed, which kernels it ran how
often, and where it sat idle.
"""

import dataclasses
import statistics
import time

import _report  # bench/_report.py, beside this script
import jax
import numpy as np
from absl import flags

import jaxpt
from jaxpt import models

flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_list("batches", ["1", "32"], "Batch sizes.")
flags.DEFINE_integer("prompt", 32, "Prompt length.", lower_bound=1)
flags.DEFINE_integer("new", 256, "New tokens per sequence.", lower_bound=1)
flags.DEFINE_integer("reps", 3, "Timed runs per row (median).", lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute.")
flags.DEFINE_bool("reference", True, "Also time transformers (skipped if not installed).")
flags.DEFINE_bool("scan_layers", True, "jaxpt: scan the layers (else unroll them).")
flags.DEFINE_enum("sdpa", "auto", ["auto", "xla", "einsum"], "jaxpt: attention implementation.")
flags.DEFINE_enum("kernels", "auto", ["auto", "xla", "pallas"], "jaxpt: model.kernels.")
flags.DEFINE_string(
    "trace", "", "Also trace one more jaxpt call a batch into TRACE/b<batch> (bench/trace_gaps.py)."
)
_report.positive_ints("batches")

VOCAB = 50257  # GPT-2's, as the reference


def median_seconds(run, reps: int) -> tuple[float, list[float]]:
    """Median wall time of ``run()`` over ``reps`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def jaxpt_row(batch: int, f) -> dict:
    """jaxpt.generate on the GPT-2 shape: new tokens/s of whole generate calls."""
    cfg = dataclasses.replace(
        models.get("gpt").default_config(),
        vocab_size=VOCAB,
        dtype=f.dtype,
        param_dtype=f.dtype,
        scan_layers=f.scan_layers,
        sdpa_implementation=f.sdpa,
        kernels=f.kernels,
    )
    params = jax.jit(lambda k: models.get("gpt").init(k, cfg))(jax.random.key(0))
    rng = np.random.default_rng(batch)

    def run():
        prompts = rng.integers(0, VOCAB, (batch, f.prompt))
        out = jaxpt.generate(params, prompts, cfg, max_new_tokens=f.new, temperature=0)
        lengths = np.asarray(jax.block_until_ready(out.lengths))
        assert (lengths == f.prompt + f.new).all(), "every row makes all its tokens"

    median, times = median_seconds(run, f.reps)
    if f.trace:
        with jax.profiler.trace(f"{f.trace}/b{batch}", create_perfetto_trace=True):
            run()
    return dict(impl="jaxpt", batch=batch, median_s=median, times_s=times)


def transformers_row(batch: int, f) -> dict | None:
    """transformers' greedy generate with its KV cache, or None without torch."""
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB))
    model.to(device=device, dtype=getattr(torch, f.dtype)).eval()

    def run():
        prompts = torch.randint(0, VOCAB, (batch, f.prompt), device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=f.new,
                min_new_tokens=f.new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == f.prompt + f.new

    median, times = median_seconds(run, f.reps)
    return dict(impl=f"transformers {device}", batch=batch, median_s=median, times_s=times)


def main(argv):
    del argv
    f = flags.FLAGS
    rows = []
    for batch in map(int, f.batches):
        candidates = [jaxpt_row(batch, f)]
        if f.reference:
            candidates.append(transformers_row(batch, f))
        for row in filter(None, candidates):
            row["new_tokens_per_s"] = batch * f.new / row["median_s"]
            rows.append(row)
    result = _report.save(
        f.out,
        "generate",
        dtype=f.dtype,
        prompt=f.prompt,
        new=f.new,
        scan_layers=f.scan_layers,
        sdpa=f.sdpa,
        kernels=f.kernels,
        rows=rows,
    )
    print(
        f"greedy decode, GPT-2 124M shape, {f.dtype}, prompt {f.prompt} + {f.new} new, "
        f"scan_layers={f.scan_layers}, sdpa={f.sdpa}, kernels={f.kernels}, {result['device']}, "
        f"{result['date']}"
    )
    print(f"{'impl':>18} {'batch':>6} {'new tok/s':>11} {'ms/token':>9}")
    for r in rows:
        ms = r["median_s"] / f.new * 1e3
        print(f"{r['impl']:>18} {r['batch']:>6} {r['new_tokens_per_s']:>11,.1f} {ms:>9.2f}")


if __name__ == "__main__":
    _report.run(main)
