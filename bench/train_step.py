"""Training-step speed: jaxpt's own train step on the GPT-2 124M config (or another preset).

    python3 bench/train_step.py --out=$OUT                     # on a GPU
    uv run python bench/train_step.py --batches=2 --seq=128      # a CPU smoke run
    python3 bench/train_step.py --preset=tiny_moe --seq=2048 --batches=8 --noscan_layers \\
        --moe_matmul=ragged --out=$OUT                           # a MoE preset's experts

The step ``launch.py`` runs (``jaxpt.train.make_train_step``: bf16 compute, float32 params and
loss, AdamW with the weight-decay mask, global-norm clipping, donated state) on
``configs/gpt.py`` (vocab 50304, 12 x 768), random tokens below 50257 (or the vocab), micro-batch
``--batches`` x ``--seq``, no accumulation. ``--warmup`` steps (compilation included), then
``--steps`` timed steps, each waited for; median. MFU = tokens/s x (6 N + 12 L D T) / peak, the
formula of ``../shared/bench/ref_torch_gpt2.py``, which is the reference to run in the same
call (N: the active parameters, ``ModelConfig.flops_per_token``). Prints a table last and
writes train_step.json to --out. ``--preset`` times another registry preset's model the same
way (its full size; the flags above set the model fields they name, and left out keep the
preset's: the bigram's table has no attention, layers or remat);
``--moe_matmul`` picks how a top-k MoE preset's experts run (``model.moe_matmul``);
``--mesh=fsdp=2`` (any of data, fsdp, tensor, expert) runs the step sharded over that many of
the host's devices, ``--batches`` sequences per device, MFU against all of them; ``--model``
sets any model field last (GPT-2 1.5B: ``--model=n_layer=48,n_embed=1600,n_head=25,``
``n_kv_head=25,n_mlp_hidden=6400``).
"""

import _report  # bench/_report.py, beside this script
import _timing
from absl import flags

from jaxpt.config import preset_config

flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_list("batches", ["16", "32"], "Micro-batch sizes (sequences).")
flags.DEFINE_integer("seq", 1024, "Sequence length.", lower_bound=1)
flags.DEFINE_integer("warmup", 5, "Untimed steps first (the first compiles).", lower_bound=1)
flags.DEFINE_integer("steps", 20, "Timed steps.", lower_bound=1)
flags.DEFINE_string("sdpa", None, "model.sdpa_implementation; default: the preset's.")
flags.DEFINE_string("remat", None, "model.remat_policy; default: the preset's.")
flags.DEFINE_bool("scan_layers", None, "model.scan_layers; default: the preset's.")
flags.DEFINE_enum(
    "logits_dtype", None, ["float32", "bfloat16"], "model.logits_dtype; default: the preset's."
)
flags.DEFINE_string("preset", "gpt", "Registry preset whose model is timed.")
flags.DEFINE_enum("moe_matmul", None, ["padded", "ragged"], "model.moe_matmul (MoE presets).")
flags.DEFINE_enum(
    "kernels", None, ["auto", "xla", "pallas"], "model.kernels; default: the preset's."
)
flags.DEFINE_list("mesh", [], "Mesh axes, e.g. fsdp=2 (the rest 1; none: one device).")
flags.DEFINE_list("xla", [], "Extra XLA options for the step, name=value (compiler_options).")
flags.DEFINE_list("model", [], "Model fields, name=value (e.g. n_layer=48), set after the rest.")
flags.DEFINE_enum("tokens", "random", _timing.TOKEN_SOURCES, "Tokens (_timing.token_sampler).")
_report.positive_ints("batches")
FIELD_FLAGS = ("scan_layers", "logits_dtype", "moe_matmul", "kernels")  # flags named as fields


def run_config(f):
    """The preset's run config as shipped, with the flags' overrides (a flag left out keeps
    the preset's value, and a model without the field, the bigram's table, has none)."""
    config = preset_config(f.preset, None)
    config.model.block_size = f.seq
    _timing.set_model_fields(
        config,
        sdpa_implementation=f.sdpa,
        remat_policy=f.remat,
        **{field: f[field].value for field in FIELD_FLAGS},
    )
    config.model.update(_timing.typed_pairs(f.model))
    return config


def time_steps(batch: int, f) -> dict:
    """One row: the preset's step at micro-batch ``batch`` per device of ``--mesh``."""
    config = run_config(f)
    config.train.batch_size = batch * _timing.set_mesh(config, f.mesh)
    options = _timing.typed_pairs(f.xla)
    return _timing.time_train_step(
        config, warmup=f.warmup, steps=f.steps, extra_compiler_options=options, tokens=f.tokens
    )


def main(argv):
    del argv
    f = flags.FLAGS
    rows = [time_steps(int(b), f) for b in f.batches]
    model = run_config(f).model
    result = _report.save(
        f.out,
        "train_step",
        preset=f.preset,
        moe_matmul=model.get("moe_matmul"),
        sdpa=model.get("sdpa_implementation"),
        remat=model.get("remat_policy"),
        scan_layers=model.get("scan_layers"),
        logits_dtype=model.get("logits_dtype"),
        kernels=model.kernels,
        mesh=f.mesh,
        xla=f.xla,
        model=f.model,
        tokens=f.tokens,
        rows=rows,
    )
    print(
        f"jaxpt {f.preset} train step, {result['device']}, {result['date']}, "
        f"sdpa={result['sdpa']}, remat={result['remat']}, scan_layers={result['scan_layers']}, "
        f"logits={result['logits_dtype']}, kernels={model.kernels}, mesh={f.mesh}, xla={f.xla}, "
        f"model={f.model}, tokens={f.tokens}"
    )
    print(f"{'batch':>6} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6}")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        print(
            f"{r['batch']:>6} {r['median_step_s'] * 1e3:>9.2f} {r['tokens_per_s']:>11,.0f} {mfu:>6}"
        )


if __name__ == "__main__":
    _report.run(main)
