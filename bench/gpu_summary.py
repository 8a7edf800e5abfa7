"""Assembles ``bench/results/gpu.json`` from one device call's bench outputs.

    python3 bench/gpu_summary.py --runs=$OUT --out=bench/results
    python3 bench/gpu_summary.py   # the README's table, from the committed bench/results/gpu.json

``--runs`` holds what ``bench/gpu.sh`` wrote: ``train_step.json`` (configs/gpt.py as shipped),
``torch_gpt2.json`` (``../shared/bench/ref_torch_gpt2.py``), ``generate.json`` (scanned
layers) and ``unrolled/generate.json``, ``hf_generate.json``
(``../shared/bench/ref_hf_generate.py``), ``presets.json`` and ``launch/scaling.json``
(``bench/scaling.sh``'s one-GPU run: launch.py's whole loop). Writes gpu.json (the
jaxpt/reference ratios of the train step at 16 and 32 x 1024 and of decoding at batch 1 and
32, scanned and unrolled; the presets' tokens/s and MFU on active parameters) and prints the
README's speed table last. Without ``--runs`` it prints the table of ``--out``'s gpu.json and
writes nothing.
"""

import json
import pathlib

import _report  # bench/_report.py, beside this script
from absl import app, flags

flags.DEFINE_string("runs", None, "Directory of one call's bench JSON files; none: print --out's.")
flags.DEFINE_string("out", "bench/results", "Directory for gpu.json.")
flags.DEFINE_integer("batch", 16, "Train micro-batch compared with the reference.")
flags.DEFINE_integer("big_batch", 32, "A second train micro-batch compared with it.")


def read(runs: pathlib.Path, name: str) -> dict:
    return json.loads((runs / f"{name}.json").read_text())


def only(rows, **match) -> dict:
    """The one row whose fields equal ``match``."""
    (row,) = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return row


def train_fields(train: dict, torch_runs: list, batch: int, prefix: str) -> dict:
    """``{prefix}tokens_per_s``, ``{prefix}ref_tokens_per_s`` and ``{prefix}ratio`` of the
    train step at micro-batch ``batch`` against torch.compile's."""
    ours = only(train["rows"], batch=batch)
    ref = only(torch_runs, mode="compile", micro_batch=batch)
    return {
        f"{prefix}tokens_per_s": ours["tokens_per_s"],
        f"{prefix}ref_tokens_per_s": ref["tokens_per_s"],
        f"{prefix}ratio": ours["tokens_per_s"] / ref["tokens_per_s"],
    }


def decode_fields(decode: dict, hf: list, batch: int, prefix: str) -> dict:
    """``{prefix}tokens_per_s``, ``{prefix}ref_tokens_per_s`` and ``{prefix}ratio`` of
    decoding at ``batch`` against transformers' compiled static cache."""
    ours = only(decode["rows"], impl="jaxpt", batch=batch)
    ref = only(hf, variant="static_cache_autocompile", batch=batch)
    return {
        f"{prefix}tokens_per_s": ours["new_tokens_per_s"],
        f"{prefix}ref_tokens_per_s": ref["new_tokens_per_s"],
        f"{prefix}ratio": ours["new_tokens_per_s"] / ref["new_tokens_per_s"],
    }


def one_device(devices: dict[str, str]) -> None:
    """Ends the script in one sentence unless every input (``{file name: its device}``, the
    ``.json`` left out) ran on one kind of device: a ratio of figures from two machines
    compares the machines."""
    if len(set(devices.values())) > 1:
        raise SystemExit(
            f"gpu_summary.py: the runs name different devices ({devices}); summarise runs "
            "of one kind of device, or the ratios compare the machines"
        )


def summary(runs: pathlib.Path, batch: int, big_batch: int) -> dict:
    train, torch, hf = (read(runs, name) for name in ("train_step", "torch_gpt2", "hf_generate"))
    presets = read(runs, "presets")
    scanned, unrolled = read(runs, "generate"), read(runs / "unrolled", "generate")
    launch = only(read(runs / "launch", "scaling")["runs"], name="one")
    one_device(
        {
            "train_step": train["device"],
            "torch_gpt2": torch["env"]["device"],
            "generate": scanned["device"],
            "unrolled/generate": unrolled["device"],
            "hf_generate": hf["env"]["device"],
            "presets": presets["device"],
            "launch/scaling": launch["device"],
        }
    )
    seq = only(train["rows"], batch=batch)["seq"]
    return dict(
        device=train["device"],
        date=train["date"],
        jax=train["jax"],
        train_config=f"configs/gpt.py as shipped, {batch} x {seq}, "
        f"scan_layers={train['scan_layers']}, logits {train['logits_dtype']}",
        **train_fields(train, torch["runs"], batch, "train_"),
        mfu=only(train["rows"], batch=batch)["mfu"],
        big_batch=big_batch,
        **train_fields(train, torch["runs"], big_batch, "train_big_"),
        train_launch_tokens_per_s=launch["tokens_per_s"],
        train_launch_mfu=launch["mfu"],
        **decode_fields(scanned, hf["runs"], 1, "decode_b1_"),
        **decode_fields(scanned, hf["runs"], 32, "decode_b32_"),
        **decode_fields(unrolled, hf["runs"], 1, "decode_unrolled_b1_"),
        **decode_fields(unrolled, hf["runs"], 32, "decode_unrolled_b32_"),
        presets=[
            dict(name=r["name"], tokens_per_s=r["tokens_per_s"], mfu_active=r["mfu"])
            for r in presets["rows"]
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
        f"| same at {s['big_batch']} x 1024 | {s['train_big_tokens_per_s']:,.0f} "
        f"| torch.compile {s['train_big_ref_tokens_per_s']:,.0f} | {s['train_big_ratio']:.2f}x |",
        f"| same, `launch.py`'s whole loop (data, logging), tokens/s "
        f"| {s['train_launch_tokens_per_s']:,.0f} (MFU {s['train_launch_mfu']:.1%}) | | |",
    ]
    for layers, prefix in (("scanned", "decode_"), ("unrolled", "decode_unrolled_")):
        for b in (1, 32):
            key = f"{prefix}b{b}_"
            lines.append(
                f"| decode, batch {b}, {layers} layers, new tokens/s "
                f"| {s[key + 'tokens_per_s']:,.0f} | transformers, compiled static cache "
                f"{s[key + 'ref_tokens_per_s']:,.0f} | {s[key + 'ratio']:.2f}x |"
            )
    lines += ["", "| preset | tokens/s | MFU (active params) |", "|---|---|---|"]
    lines += [
        f"| {p['name']} | {p['tokens_per_s']:,.0f} | {p['mfu_active']:.1%} |" for p in s["presets"]
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    f = flags.FLAGS
    if f.runs is None:
        print(table(_report.committed(f.out, "gpu")))
        return
    s = summary(pathlib.Path(f.runs), f.batch, f.big_batch)
    out = pathlib.Path(f.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(s, indent=1) + "\n")
    print(table(s))


if __name__ == "__main__":
    app.run(main)
