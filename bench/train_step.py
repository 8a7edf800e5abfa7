"""Training-step speed: jaxpt's own train step on the GPT-2 124M config.

    python3 bench/train_step.py --out=$OUT                     # on a GPU
    uv run python bench/train_step.py --batches=2 --seq=128      # a CPU smoke run

The step ``launch.py`` runs (``jaxpt.train.make_train_step``: bf16 compute, float32 params and
loss, AdamW with the weight-decay mask, global-norm clipping, donated state) on
``configs/gpt.py`` (vocab 50304, 12 x 768), random tokens below 50257, micro-batch
``--batches`` x ``--seq``, no accumulation. ``--warmup`` steps (compilation included), then
``--steps`` timed steps, each waited for; median. MFU = tokens/s x (6 N + 12 L D T) / peak, the
formula of ``../shared/bench/ref_torch_gpt2.py``, which is the reference to run in the same
call. Prints a table last and writes train_step.json to --out.
"""

import _report  # bench/_report.py, beside this script
import _timing
from absl import app, flags

from jaxpt.config import preset_config

flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_list("batches", ["16", "32"], "Micro-batch sizes (sequences).")
flags.DEFINE_integer("seq", 1024, "Sequence length.")
flags.DEFINE_integer("warmup", 5, "Untimed steps first (compilation included).")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_string("sdpa", "auto", "model.sdpa_implementation.")
flags.DEFINE_string("remat", "none", "model.remat_policy.")
flags.DEFINE_bool("scan_layers", None, "model.scan_layers; default: the preset's.")
flags.DEFINE_enum(
    "logits_dtype", None, ["float32", "bfloat16"], "model.logits_dtype; default: the preset's."
)


def gpt_config(f):
    """``configs/gpt.py`` as shipped, with the flags' overrides."""
    config = preset_config("gpt", None)
    config.model.update(block_size=f.seq, sdpa_implementation=f.sdpa, remat_policy=f.remat)
    for field in ("scan_layers", "logits_dtype"):
        if f[field].value is not None:
            config.model[field] = f[field].value
    return config


def time_steps(batch: int, f) -> dict:
    """One row: the GPT-2 124M step at micro-batch ``batch``."""
    config = gpt_config(f)
    config.train.batch_size = batch
    return _timing.time_train_step(config, warmup=f.warmup, steps=f.steps)


def main(argv):
    del argv
    f = flags.FLAGS
    rows = [time_steps(int(b), f) for b in f.batches]
    model = gpt_config(f).model
    result = _report.save(
        f.out,
        "train_step",
        sdpa=f.sdpa,
        remat=f.remat,
        scan_layers=model.scan_layers,
        logits_dtype=model.logits_dtype,
        rows=rows,
    )
    print(
        f"jaxpt GPT-2 124M train step, {result['device']}, {result['date']}, sdpa={f.sdpa}, "
        f"remat={f.remat}, scan_layers={model.scan_layers}, logits={model.logits_dtype}"
    )
    print(f"{'batch':>6} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6}")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        print(
            f"{r['batch']:>6} {r['median_step_s'] * 1e3:>9.2f} {r['tokens_per_s']:>11,.0f} {mfu:>6}"
        )


if __name__ == "__main__":
    app.run(main)
