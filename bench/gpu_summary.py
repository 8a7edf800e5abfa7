"""Assembles ``bench/results/gpu.json`` from one device call's bench outputs.

    python3 bench/gpu_summary.py --runs=$OUT --out=bench/results

``--runs`` holds what ``bench/gpu.sh`` wrote: ``train_step.json`` (configs/gpt.py as shipped),
``torch_gpt2.json`` (``../shared/bench/ref_torch_gpt2.py``), ``generate.json``,
``hf_generate.json`` (``../shared/bench/ref_hf_generate.py``), ``presets.json`` and
``launch/scaling.json`` (``bench/scaling.sh``'s one-GPU run: launch.py's whole loop). Writes
gpu.json (the jaxpt/reference ratios at 16 x 1024 and decode batch 1, the presets' tokens/s
and MFU on active parameters) and prints the README's speed table last.
"""

import json
import pathlib

from absl import app, flags

flags.DEFINE_string("runs", None, "Directory with one call's bench JSON files.", required=True)
flags.DEFINE_string("out", "bench/results", "Directory for gpu.json.")
flags.DEFINE_integer("batch", 16, "Train micro-batch compared with the reference.")


def read(runs: pathlib.Path, name: str) -> dict:
    return json.loads((runs / f"{name}.json").read_text())


def only(rows, **match) -> dict:
    """The one row whose fields equal ``match``."""
    (row,) = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return row


def summary(runs: pathlib.Path, batch: int) -> dict:
    train = read(runs, "train_step")
    torch_runs = read(runs, "torch_gpt2")["runs"]
    decode = read(runs, "generate")
    hf = read(runs, "hf_generate")["runs"]
    ours = only(train["rows"], batch=batch)
    ref = only(torch_runs, mode="compile", micro_batch=batch)
    b1 = only(decode["rows"], impl="jaxpt", batch=1)
    b32 = only(decode["rows"], impl="jaxpt", batch=32)
    hf_b1 = only(hf, variant="static_cache_autocompile", batch=1)
    hf_b32 = only(hf, variant="static_cache_autocompile", batch=32)
    launch = only(read(runs / "launch", "scaling")["runs"], name="one")
    return dict(
        device=train["device"],
        date=train["date"],
        jax=train["jax"],
        train_config=f"configs/gpt.py as shipped, {batch} x {ours['seq']}, "
        f"scan_layers={train['scan_layers']}, logits {train['logits_dtype']}",
        train_tokens_per_s=ours["tokens_per_s"],
        train_ref_tokens_per_s=ref["tokens_per_s"],
        train_ratio=ours["tokens_per_s"] / ref["tokens_per_s"],
        mfu=ours["mfu"],
        train_launch_tokens_per_s=launch["tokens_per_s"],
        train_launch_mfu=launch["mfu"],
        decode_b1_tokens_per_s=b1["new_tokens_per_s"],
        decode_b1_ref_tokens_per_s=hf_b1["new_tokens_per_s"],
        decode_b1_ratio=b1["new_tokens_per_s"] / hf_b1["new_tokens_per_s"],
        decode_b32_tokens_per_s=b32["new_tokens_per_s"],
        decode_b32_ref_tokens_per_s=hf_b32["new_tokens_per_s"],
        decode_b32_ratio=b32["new_tokens_per_s"] / hf_b32["new_tokens_per_s"],
        presets=[
            dict(name=r["name"], tokens_per_s=r["tokens_per_s"], mfu_active=r["mfu"])
            for r in read(runs, "presets")["rows"]
        ],
    )


def table(s: dict) -> str:
    """The README's speed table (markdown)."""
    lines = [
        f"{s['device']}, {s['date']}, jax {s['jax']}; {s['train_config']}.",
        "",
        "| what | jaxpt | reference (same call) | ratio |",
        "|---|---|---|---|",
        f"| GPT-2 124M train step, tokens/s | {s['train_tokens_per_s']:,.0f} "
        f"(MFU {s['mfu']:.1%}) | torch.compile {s['train_ref_tokens_per_s']:,.0f} "
        f"| {s['train_ratio']:.2f}x |",
        f"| same, `launch.py`'s whole loop (data, logging), tokens/s "
        f"| {s['train_launch_tokens_per_s']:,.0f} (MFU {s['train_launch_mfu']:.1%}) | | |",
    ]
    for b in ("b1", "b32"):
        lines.append(
            f"| decode, batch {b[1:]}, new tokens/s | {s[f'decode_{b}_tokens_per_s']:,.0f} "
            f"| transformers, compiled static cache {s[f'decode_{b}_ref_tokens_per_s']:,.0f} "
            f"| {s[f'decode_{b}_ratio']:.2f}x |"
        )
    lines += ["", "| preset | tokens/s | MFU (active params) |", "|---|---|---|"]
    lines += [
        f"| {p['name']} | {p['tokens_per_s']:,.0f} | {p['mfu_active']:.1%} |" for p in s["presets"]
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    f = flags.FLAGS
    s = summary(pathlib.Path(f.runs), f.batch)
    out = pathlib.Path(f.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(s, indent=1) + "\n")
    print(table(s))


if __name__ == "__main__":
    app.run(main)
