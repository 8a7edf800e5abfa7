"""Training-step speed of every preset as shipped (``configs/NAME.py``).

    python3 bench/presets.py --out=$OUT gpt gqa_glu_rope smollm tiny_moe    # on a GPU

Each config as its file ships it (dtype, layer loop, logits), ``--tokens`` tokens per step
(``--tokens // block_size`` sequences), random tokens, ``--warmup`` untimed steps then
``--steps`` timed ones, median (``bench/_timing.py``). MFU counts the parameters a token runs
through (``ModelConfig.flops_per_token``: top_k of n_experts). Prints a table last and writes
presets.json to --out.
"""

import _report  # bench/_report.py, beside this script
import _timing
from absl import flags

from jaxpt.config import load_config_file

flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_integer("tokens", 16384, "Tokens per step.", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first compiles).", lower_bound=1)
flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1)


def time_preset(name: str, f) -> dict:
    """One row: ``configs/{name}.py``'s train step."""
    config = load_config_file(f"configs/{name}.py")
    config.train.batch_size = max(1, f.tokens // config.model.block_size)
    _timing.set_mesh(config, [])  # one device
    return dict(name=name, **_timing.time_train_step(config, warmup=f.warmup, steps=f.steps))


def main(argv):
    f = flags.FLAGS
    if len(argv) < 2:
        raise SystemExit("presets.py: name the presets to time, e.g. bench/presets.py gpt smollm")
    rows = []
    for name in argv[1:]:  # saved after each, so a call cut short keeps what it measured
        rows.append(time_preset(name, f))
        result = _report.save(f.out, "presets", tokens_per_step=f.tokens, rows=rows)
    print(f"train step of each preset as shipped, {result['device']}, {result['date']}")
    print(f"{'preset':<14} {'B x T':>10} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6}")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        shape = f"{r['batch']} x {r['seq']}"
        print(
            f"{r['name']:<14} {shape:>10} {r['median_step_s'] * 1e3:>9.2f} "
            f"{r['tokens_per_s']:>11,.0f} {mfu:>6}"
        )


if __name__ == "__main__":
    _report.run(main)
