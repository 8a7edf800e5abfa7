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
README's speed table last. A reference run that failed (it recorded an ``error``, no figure)
reads "failed" there, its ratio "-", and its error is kept in gpu.json (``*_ref_error``).
Without ``--runs`` it prints the table of ``--out``'s gpu.json and writes nothing.
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


def reference(rows, **match) -> dict:
    """The reference's row whose fields equal ``match``; where that run failed it holds an
    ``error`` and no figure, and where it did not run at all it is such a row too."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return only(found) if found else {"error": "not run", **match}


def compared(ours: float, ref_row: dict, key: str, prefix: str) -> dict:
    """``{prefix}tokens_per_s`` (``ours``), ``{prefix}ref_tokens_per_s`` (``ref_row[key]``) and
    ``{prefix}ratio``; the last two None where the reference run failed, its error then in
    ``{prefix}ref_error``."""
    ref = ref_row.get(key)
    fields = {
        f"{prefix}tokens_per_s": ours,
        f"{prefix}ref_tokens_per_s": ref,
        f"{prefix}ratio": None if ref is None else ours / ref,
    }
    if ref is None:
        fields[f"{prefix}ref_error"] = ref_row.get("error", f"recorded no {key}")
    return fields


def train_fields(train: dict, torch_runs: list, batch: int, prefix: str) -> dict:
    """``compared`` for the train step at micro-batch ``batch`` against torch.compile's."""
    ours = only(train["rows"], batch=batch)["tokens_per_s"]
    ref = reference(torch_runs, mode="compile", micro_batch=batch)
    return compared(ours, ref, "tokens_per_s", prefix)


def decode_fields(decode: dict, hf: list, batch: int, prefix: str) -> dict:
    """``compared`` for decoding at ``batch`` against transformers' compiled static cache."""
    ours = only(decode["rows"], impl="jaxpt", batch=batch)["new_tokens_per_s"]
    ref = reference(hf, variant="static_cache_autocompile", batch=batch)
    return compared(ours, ref, "new_tokens_per_s", prefix)


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


def against(s: dict, prefix: str, name: str) -> str:
    """The reference and ratio cells of the ``compared`` fields ``prefix``: "failed" and "-"
    where the reference run failed."""
    ref = s[prefix + "ref_tokens_per_s"]
    if ref is None:
        return f"{name} failed | -"
    return f"{name} {ref:,.0f} | {s[prefix + 'ratio']:.2f}x"


def table(s: dict) -> str:
    """The README's speed table (markdown)."""
    lines = [
        f"{s['device']}, {s['date']}, jax {s['jax']}; {s['train_config']}.",
        "",
        "| what | jaxpt | reference (same call) | ratio |",
        "|---|---|---|---|",
        f"| GPT-2 124M train step, tokens/s | {s['train_tokens_per_s']:,.0f} "
        f"(MFU {s['mfu']:.1%}) | {against(s, 'train_', 'torch.compile')} |",
        f"| same at {s['big_batch']} x 1024 | {s['train_big_tokens_per_s']:,.0f} "
        f"| {against(s, 'train_big_', 'torch.compile')} |",
        f"| same, `launch.py`'s whole loop (data, logging), tokens/s "
        f"| {s['train_launch_tokens_per_s']:,.0f} (MFU {s['train_launch_mfu']:.1%}) | | |",
    ]
    for layers, prefix in (("scanned", "decode_"), ("unrolled", "decode_unrolled_")):
        for b in (1, 32):
            key = f"{prefix}b{b}_"
            lines.append(
                f"| decode, batch {b}, {layers} layers, new tokens/s "
                f"| {s[key + 'tokens_per_s']:,.0f} "
                f"| {against(s, key, 'transformers, compiled static cache')} |"
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
