"""Training-step speed: jaxpt's own train step on the GPT-2 124M config (or another preset).

    python3 bench/train_step.py --out=$OUT                     # on a GPU
    uv run python bench/train_step.py --batches=2 --seq=128      # a CPU smoke run
    python3 bench/train_step.py --preset=tiny_moe --seq=2048 --batches=8 --noscan_layers \
        --moe_matmul=ragged --out=$OUT                           # a MoE preset's experts

The step ``launch.py`` runs (``jaxpt.train.make_train_step``: bf16 compute, float32 params and
loss, AdamW with the weight-decay mask, global-norm clipping, donated state) on
``configs/gpt.py`` (vocab 50304, 12 x 768), random tokens below 50257 (or the vocab), micro-batch
``--batches`` x ``--seq``, no accumulation. ``--warmup`` steps (compilation included), then
``--steps`` timed steps, each waited for; median. MFU = tokens/s x (6 N + 12 L D T) / peak, the
formula of ``../shared/bench/ref_torch_gpt2.py``, which is the reference to run in the same
call (N: the active parameters, ``ModelConfig.flops_per_token``). Prints a table last and
writes train_step.json to --out. ``--preset`` times another registry preset's model the same
way (its full size; the flags above still set the model fields they name);
``--moe_matmul`` picks how a top-k MoE preset's experts run (``model.moe_matmul``).
"""

import statistics
import time

import _report  # bench/_report.py, beside this script
import jax
import numpy as np
from absl import app, flags

from jaxpt import models, train
from jaxpt.config import preset_config

flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_list("batches", ["16", "32"], "Micro-batch sizes (sequences).")
flags.DEFINE_integer("seq", 1024, "Sequence length.")
flags.DEFINE_integer("warmup", 5, "Untimed steps first (compilation included).")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_string("sdpa", "auto", "model.sdpa_implementation.")
flags.DEFINE_string("remat", "none", "model.remat_policy.")
flags.DEFINE_bool("scan_layers", True, "model.scan_layers (else an unrolled loop).")
flags.DEFINE_enum("logits_dtype", "float32", ["float32", "bfloat16"], "model.logits_dtype.")
flags.DEFINE_string("preset", "gpt", "Registry preset whose model is timed.")
flags.DEFINE_enum("moe_matmul", None, ["padded", "ragged"], "model.moe_matmul (MoE presets).")


def time_steps(batch: int, f) -> dict:
    """Median seconds of one train step at micro-batch ``batch``."""
    config = preset_config(f.preset, None)
    if f.moe_matmul is not None:
        config.model.moe_matmul = f.moe_matmul
    config.model.update(
        block_size=f.seq,
        sdpa_implementation=f.sdpa,
        remat_policy=f.remat,
        scan_layers=f.scan_layers,
        logits_dtype=f.logits_dtype,
    )
    config.train.update(batch_size=batch, grad_accum_steps=1)
    cfg = models.config_from(config.model)
    abstract_params = jax.eval_shape(lambda k: models.get(cfg.name).init(k, cfg), jax.random.key(0))
    tx = train.optimizer(config.train, abstract_params)
    state = jax.jit(lambda k: train.init_state(k, cfg, tx))(jax.random.key(0))
    step = jax.jit(
        train.make_train_step(config, tx),
        donate_argnums=0,
        compiler_options=train.STEP_COMPILER_OPTIONS,
    )
    rng = np.random.default_rng(0)
    times = []
    for i in range(f.warmup + f.steps):
        tokens = rng.integers(0, min(cfg.vocab_size, 50257), (batch, f.seq + 1), dtype=np.int32)
        start = time.perf_counter()
        state, metrics = step(state, tokens[:, :-1], tokens[:, 1:])
        jax.block_until_ready(metrics["loss"])
        if i >= f.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens_per_s = batch * f.seq / median
    flops = cfg.flops_per_token * tokens_per_s
    peak = train.peak_flops(jax.devices()[0].device_kind)
    return dict(
        batch=batch,
        seq=f.seq,
        median_step_s=median,
        min_step_s=min(times),
        tokens_per_s=tokens_per_s,
        model_flops_per_s=flops,
        mfu=None if peak is None else flops / peak,
        final_loss=float(metrics["loss"]),
    )


def main(argv):
    del argv
    f = flags.FLAGS
    rows = [time_steps(int(b), f) for b in f.batches]
    result = _report.save(
        f.out,
        "train_step",
        preset=f.preset,
        moe_matmul=f.moe_matmul,
        sdpa=f.sdpa,
        remat=f.remat,
        scan_layers=f.scan_layers,
        logits_dtype=f.logits_dtype,
        rows=rows,
    )
    print(
        f"jaxpt {f.preset} train step, moe_matmul={f.moe_matmul}, {result['device']}, "
        f"{result['date']}, sdpa={f.sdpa}, "
        f"remat={f.remat}, scan_layers={f.scan_layers}, logits={f.logits_dtype}"
    )
    print(f"{'batch':>6} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6}")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        print(
            f"{r['batch']:>6} {r['median_step_s'] * 1e3:>9.2f} {r['tokens_per_s']:>11,.0f} {mfu:>6}"
        )


if __name__ == "__main__":
    app.run(main)
