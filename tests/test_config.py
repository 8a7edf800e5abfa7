"""Run configs: every field's range check before anything compiles, the optimizer's clipping
switch, sampling options, and launch.py's one-sentence errors for bad flags and workdirs."""

import ast
import dataclasses
import itertools
import math
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt import data, launcher, models, train
from jaxpt.config import check_config_flags, check_override, config_text, parse_flags
from jaxpt.errors import ConfigError
from jaxpt.hf.__main__ import export_checkpoint
from tests.conftest import use_devices
from tests.test_train import CONFIG_FILES, ROOT, char_config, load_config

BAD_FIELDS = [
    ("train.steps", 0),
    ("train.batch_size", -8),
    ("train.grad_accum_steps", 0),  # was a ZeroDivisionError inside the validation
    ("train.warmup_steps", -1),
    ("train.seed", -1),
    ("train.lr", math.inf),  # passed, then every loss was NaN
    ("train.lr", math.nan),
    ("train.min_lr_ratio", 5.0),  # was accepted: the lr rose to 5x its peak
    ("train.min_lr_ratio", -0.5),
    ("train.decay_fraction", 1.5),
    ("train.weight_decay", -0.1),
    ("train.b1", 1.0),
    ("train.b2", -0.1),
    ("train.eps", 0.0),
    ("train.grad_clip", -1.0),  # was gradient ascent
    ("train.grad_clip", math.nan),
    ("train.load_balance_loss_coeff", -1.0),
    ("train.z_loss_coeff", math.inf),
    ("mesh.tensor", 0),
    ("mesh.fsdp", -2),
    ("mesh.dcn_data", 0),
    ("mesh.shard_optimizer", None),  # a config file's None
    ("checkpoint.every_steps", 0),  # these three were a ZeroDivisionError after step 1
    ("eval.every_steps", 0),
    ("log.every_steps", 0),
    ("eval.batches", 0),  # these two were a KeyError at the first evaluation
    ("eval.batches", -1),
    ("model.vocab_size", 0),
    ("model.n_layer", 0),
    ("model.init_stddev", -0.02),
    ("model.ln_epsilon", 0.0),
    ("model.rope_base", -1.0),
]


def small_config(**train_overrides):
    return char_config(steps=2, **train_overrides)


@pytest.mark.parametrize("path, value", BAD_FIELDS, ids=[f"{p}={v}" for p, v in BAD_FIELDS])
def test_every_bad_field_is_one_sentence_before_anything_runs(path, value, tmp_path):
    config = small_config(schedule="wsd")  # the schedule that reads decay_fraction
    section, field = path.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=f"^{path}={value!r} must be ") as caught:
        train.train(config, tmp_path / "run")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()  # nothing written, nothing compiled


def test_an_empty_workdir_is_one_sentence_not_the_current_directory(tmp_path, monkeypatch):
    """``train.train(config, "")`` trained in the current directory, beside whatever it held;
    only the launcher refused an empty --workdir."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^the workdir is empty: name the run's directory"):
        train.train(small_config(), "")
    assert list(tmp_path.iterdir()) == []


def test_a_field_no_run_config_has_is_one_sentence_before_anything_runs(tmp_path):
    """A config built in Python for ``train.train`` that set a misspelt field trained at the
    default, the field never read."""
    config = small_config()
    config.train.lerning_rate = 1e-3
    with pytest.raises(ConfigError) as caught:
        train.train(config, tmp_path / "run")
    assert str(caught.value) == (
        "the run config sets train.lerning_rate, but train has no such field; the fields are "
        + ", ".join(sorted(small_config().train))
        + "."
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("coefficient", ["load_balance_loss_coeff", "z_loss_coeff"])
@pytest.mark.parametrize("preset", ["gpt", "tiny_moe_3"])
def test_a_router_loss_without_a_router_is_one_sentence(preset, coefficient, tmp_path):
    """The MoE losses' coefficients on a model with no top-k router (a dense GPT, Soft MoE)
    were accepted and weighed zeros: the run trained without the loss it asked for."""
    config = load_config(ROOT / "configs" / f"{preset}.py", "smoke")
    config.train[coefficient] = 1e-3
    with pytest.raises(ConfigError, match=rf"^train\.{coefficient}=0\.001 weighs a top-k rout"):
        train.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "mesh, message",
    [
        (dict(data=-1, fsdp=-1), r"mesh\.data and mesh\.fsdp are all -1"),
        (dict(rules=dict(batch=("dta",))), r"mesh\.rules\.batch=\('dta',\) names 'dta'"),
        # --config.mesh.rules.batch=1 and =None: TypeError tracebacks
        (dict(rules=dict(batch=(1,))), r"mesh\.rules\.batch=\(1,\) names 1, not one of the"),
        (dict(rules=dict(batch=(None,))), r"mesh\.rules\.batch=\(None,\) names None, not one"),
    ],
)
def test_mesh_rules_and_sizes_name_the_field(mesh, message):
    config = small_config()
    config.mesh.update(mesh)
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(mesh=dict(data=3)), "The mesh {'data': 3, 'fsdp': 1, 'tensor': 1, 'expert': 1}"),
        (dict(train=dict(batch_size=6)), "A micro-batch of 6 sequences (train.batch_size=6 / "),
    ],
)
def test_the_mesh_is_checked_before_the_data_is_read(fields, words, tmp_path, monkeypatch):
    """A hub dataset is downloaded and tokenized before training: these came after that."""
    use_devices(monkeypatch, 4)
    monkeypatch.setattr(data, "ensure_prepared", lambda *a, **k: pytest.fail("data read"))
    config = small_config()
    for section, values in fields.items():
        config[section].update(values)
    with pytest.raises(ConfigError) as caught:
        train.train(config, tmp_path / "run")
    assert str(caught.value).startswith(words)


@pytest.mark.parametrize("steps, warmup_steps", [(100, 715), (20, 20)])
def test_a_run_that_never_leaves_its_warmup_says_so(steps, warmup_steps):
    """gpt.py's docstring command --config.train.steps=100 (warmup 715) trained at a tenth of
    train.lr or less, silently: the lr ends at (steps - 1) / warmup_steps of its peak."""
    config = small_config(warmup_steps=warmup_steps, lr=6e-4)
    config.train.steps = steps
    note = train.warmup_note(config.train)
    last = 6e-4 * (steps - 1) / warmup_steps
    assert note.startswith(f"note: train.warmup_steps={warmup_steps} is not below train.steps=")
    assert f"to {last:.3g} ({(steps - 1) / warmup_steps:.0%} of train.lr) at the last step" in note
    config.train.steps = warmup_steps + 1
    assert train.warmup_note(config.train) is None


def test_every_preset_passes_as_shipped_with_every_optimizer_and_schedule():
    """No preset sets an optimizer field (b1, b2, eps) that one of the optimizers ignores, nor
    a schedule field (decay_fraction) that one of the schedules ignores."""
    for path in CONFIG_FILES:
        for arg in ("smoke", None):
            config = load_config(path, arg)
            for optimizer, schedule in itertools.product(train.OPTIMIZERS, train.SCHEDULES):
                config.train.update(optimizer=optimizer, schedule=schedule)
                train.validate_config(config)


def read_config_text(text: str) -> dict:
    """The fields of ``config_text``'s lines, by dotted name: its values read as the flags
    would (a literal, else the bare string)."""
    fields, sections = {}, []
    for line in text.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        name, shown = line.strip().split(": ", 1) if ": " in line else (line.strip()[:-1], None)
        sections[depth:] = [name]
        if shown is not None:
            try:
                fields[".".join(sections)] = ast.literal_eval(shown)
            except (ValueError, SyntaxError):
                fields[".".join(sections)] = shown
    return fields


def flat_fields(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_fields(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.stem)
def test_the_printed_config_reads_back_as_every_field_without_yaml_aliases(path):
    """A run prints its config at start. ConfigDict's YAML showed mesh.rules' tuples tagged
    ``!!python/tuple``, one per line, and a tuple the default rules shared (``('tensor',)``)
    once, then as ``*id001`` under the other names that had it."""
    config = load_config(path, None)
    text = config_text(config)
    assert "*id" not in text and "!!" not in text
    assert read_config_text(text) == flat_fields(config.to_dict())
    assert "    mlp: ('tensor', 'fsdp')" in text.splitlines()


@pytest.mark.parametrize(
    "optimizer, field, value, reads",
    [
        ("adafactor", "b1", 0.8, "none of b1, b2 and eps"),  # no momentum
        ("adafactor", "b2", 0.99, "none of b1, b2 and eps"),  # its own decay, 1 - step^-0.8
        ("adafactor", "eps", 1e-6, "none of b1, b2 and eps"),
        ("lion", "eps", 1e-6, "train.b1 and train.b2"),  # a sign: nothing to divide
    ],
)
def test_a_field_the_optimizer_ignores_is_one_sentence(optimizer, field, value, reads, tmp_path):
    """These were accepted and had no effect."""
    config = small_config(optimizer=optimizer, **{field: value})
    with pytest.raises(ConfigError) as caught:
        launcher.run(config, workdir=str(tmp_path / "run"), mode="train")
    assert str(caught.value) == (
        f"train.{field}={value!r} has no effect with train.optimizer={optimizer!r}, which reads "
        f"{reads}: leave train.{field} unset (None), or choose an optimizer that reads it."
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule", ["cosine", "inverse_sqrt"])
def test_a_decay_fraction_the_schedule_ignores_is_one_sentence(schedule, tmp_path):
    """It was accepted and had no effect."""
    config = small_config(schedule=schedule, decay_fraction=0.3)
    with pytest.raises(ConfigError) as caught:
        launcher.run(config, workdir=str(tmp_path / "run"), mode="train")
    assert str(caught.value) == (
        f"train.decay_fraction=0.3 has no effect with train.schedule={schedule!r} (only 'wsd' "
        "decays over a fraction of the steps): leave train.decay_fraction unset (None), or set "
        "train.schedule='wsd'."
    )
    assert not (tmp_path / "run").exists()


def first_update(grad_clip: float):
    """The first AdamW update of a bigram table for a large gradient, clipped by ``grad_clip``
    (a large ``eps`` makes Adam's update depend on the gradient's scale)."""
    config = small_config(grad_clip=grad_clip, warmup_steps=0, weight_decay=0.0, eps=1.0)
    cfg = dataclasses.replace(models.get("bigram").default_config(), vocab_size=4)
    params = models.get("bigram").init(jax.random.key(0), cfg)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 10.0), params)
    tx = train.optimizer(config.train, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return np.asarray(updates.table.weight)


def test_grad_clip_0_is_no_clipping():
    unclipped = first_update(1e30)
    assert np.all(unclipped < 0)  # a step against the gradient
    np.testing.assert_array_equal(first_update(0.0), unclipped)  # was no update at all
    assert np.all(np.abs(first_update(1.0)) < np.abs(unclipped))  # clipping shrinks it


@pytest.mark.parametrize(
    "options, flag",
    [
        (dict(temperature=math.nan), "--temperature=nan"),  # printed garbage, exit 0
        (dict(temperature=math.inf), "--temperature=inf"),  # drew a padding id and crashed
        (dict(temperature=-1.0), "--temperature=-1.0"),
        (dict(top_p=1.5), "--top_p=1.5"),  # was silently no filter
        (dict(top_p=0.0), "--top_p=0.0"),
        (dict(top_k=-1), "--top_k=-1"),
        (dict(top_k=10**6), "--top_k=1000000"),  # refused by generate, after the checkpoint
        (dict(num_samples=0), "--num_samples=0"),
        (dict(max_new_tokens=-1), "--max_new_tokens=-1"),  # 0: as many as the block leaves
        (dict(seed=-1), "--seed=-1"),
    ],
)
def test_sampling_options_are_checked_before_loading_anything(options, flag, tmp_path):
    with pytest.raises(ConfigError, match=f"^{flag} must be "):
        launcher.sample(small_config(), tmp_path, launcher.SampleOptions(**options))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_workdir_is_one_sentence(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            launcher.run(small_config(), workdir=str(tmp_path / "run"), mode="train")
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize("below", ["", "run"])
@pytest.mark.parametrize("command", ["train", "export"])
def test_a_directory_through_a_dangling_link_is_one_sentence(command, below, tmp_path):
    """mkdir raised FileExistsError, a traceback: training once the data was read, the
    export once the params were read."""
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    out = tmp_path / "link" / below
    flag = "--workdir" if command == "train" else "--out"
    with pytest.raises(
        ConfigError,
        match=rf"^{flag}=.* is a symbolic link to {re.escape(str(tmp_path / 'gone'))}, which does "
        "not exist; create that directory or choose another",
    ):
        if command == "train":
            launcher.run(small_config(), workdir=str(out), mode="train")
        else:
            export_checkpoint(small_config(), tmp_path / "trained", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


GPT_SMOKE = f"--config={ROOT / 'configs' / 'gpt.py'}:smoke"
UNSET_B1 = "is not a number; write one, or leave the flag out to keep train.b1 unset (None)."


@pytest.mark.parametrize(
    "path, value, words",
    [
        ("train.steps", "1e3", "is not a whole number; write one, e.g. --config.train.steps=200."),
        ("train.lr", "fast", "is not a number; write one, e.g. --config.train.lr=0.003."),
        ("log.shardings", "maybe", "is not true or false; write one, e.g. --config.log.shardings="),
        # unset: the optimizer's default; the start of a run prints it as `b1: None`
        ("train.b1", "None", UNSET_B1),
        ("train.b1", "high", UNSET_B1),
    ],
)
def test_an_override_that_does_not_parse_is_one_sentence(path, value, words):
    """These were Python's words: "invalid literal for int() with base 10: '1e3'", "could not
    convert string to float: 'fast'", "('Non-boolean argument to boolean flag', 'maybe')". An
    unset field, printed as None, said only "write one", not how to keep it unset."""
    with pytest.raises(ConfigError) as caught:
        check_config_flags(["launch.py", GPT_SMOKE, f"--config.{path}={value}"])
    assert str(caught.value).startswith(f"--config.{path}={value!r} {words}")


def spellings(path: str, value: str) -> list[list[str]]:
    """The two ways absl takes a flag's value: ``--flag=value`` and ``--flag value``."""
    return [[f"--config.{path}={value}"], [f"--config.{path}", value]]


@pytest.mark.parametrize("override", spellings("train.steps", "1e3"), ids=["equals", "space"])
def test_an_override_is_checked_however_it_is_spelt(override):
    """``--config.train.steps 1e3`` was config_flags' words, "invalid literal for int() with
    base 10: '1e3'"; a switch takes no value, so the argument after it is left alone."""
    with pytest.raises(ConfigError, match=re.escape("--config.train.steps='1e3' is not a whole")):
        check_config_flags(["launch.py", GPT_SMOKE, *override])
    check_config_flags(["launch.py", GPT_SMOKE, "--config.log.shardings", "--config.train.steps=5"])


@pytest.mark.parametrize("override", spellings("model.name", "gqa_gpt"), ids=["equals", "space"])
def test_overriding_the_model_name_is_one_sentence(override):
    """It trained gpt's layers (4 query and 4 key/value heads at smoke size) labelled gqa_gpt,
    whose own config has 2 key/value heads; spelt with a space, it still did."""
    with pytest.raises(ConfigError) as caught:
        check_config_flags(["launch.py", GPT_SMOKE, *override])
    assert str(caught.value).startswith(
        "--config.model.name=gqa_gpt would only relabel the model section, which holds gpt's"
    )
    check_config_flags(["launch.py", GPT_SMOKE, *spellings("model.name", "gpt")[1]])


@pytest.mark.parametrize(
    "files, overrides",
    [
        # config_flags' AttributeError traceback: it defined each file's override flags
        (["bigram.py:smoke", "gpt.py:smoke"], ["--config.model.n_kv_head=1"]),
        (["gpt.py:smoke", "gqa_gpt.py"], []),  # trained the last, gqa_gpt's full run
    ],
    ids=["fields differ", "silently the last"],
)
def test_a_repeated_config_flag_is_one_sentence(files, overrides):
    configs = [f"--config={ROOT / 'configs' / file}" for file in files]
    with pytest.raises(ConfigError) as caught:
        check_config_flags(["launch.py", *configs, *overrides])
    assert str(caught.value).startswith("--config is given 2 times (")
    assert str(caught.value).endswith(
        "; give one config file, and change its fields with --config.<field>=value."
    )


def test_flags_in_a_flagfile_are_checked(tmp_path):
    """absl and config_flags read ``--flagfile``'s flags in its place, the checks did not: an
    unknown field there was config_flags' AttributeError traceback, a missing config file its
    FileNotFoundError."""
    flagfile = tmp_path / "flags"
    flagfile.write_text(f"{GPT_SMOKE}\n--config.train.stpes=5\n")
    with pytest.raises(SystemExit) as caught:
        parse_flags("launch.py")(["launch.py", f"--flagfile={flagfile}"])
    assert caught.value.code.startswith(
        "launch.py: --config.train.stpes: config.train has no field 'stpes'; did you mean steps?"
    )


def test_a_flagfile_that_cannot_be_read_is_one_sentence(tmp_path):
    """A directory, or a missing file named inside a flagfile, as --flagfile."""
    (tmp_path / "flags").write_text(f"--flagfile={tmp_path / 'gone'}\n")
    for flagfile, reason in ((tmp_path, "Is a directory"), (tmp_path / "flags", "No such file")):
        with pytest.raises(SystemExit) as caught:
            parse_flags("launch.py")(["launch.py", GPT_SMOKE, f"--flagfile={flagfile}"])
        named = tmp_path if flagfile == tmp_path else tmp_path / "gone"
        assert caught.value.code.startswith(
            f"launch.py: --flagfile={named} cannot be read ({reason}"
        )
        assert caught.value.code.endswith("; name a file of flags, one --flag=value a line.")


@pytest.mark.parametrize("arg", ["smoke,smoke=false", "smoke,smoke"])
def test_a_config_argument_given_twice_is_one_sentence(arg):
    """``:smoke,smoke=false`` was the full run (the last won), silently."""
    with pytest.raises(ConfigError) as caught:
        check_config_flags(["launch.py", f"{GPT_SMOKE.partition(':')[0]}:{arg}"])
    assert str(caught.value).endswith(": config argument 'smoke' is given twice; give it once.")


@pytest.mark.parametrize("value", ["1000", "0x10", "-1"])
def test_an_override_that_parses_passes(value):
    check_config_flags(["launch.py", GPT_SMOKE, f"--config.train.steps={value}"])


@pytest.mark.parametrize(
    "path, words",
    [
        # these listed every field of the section, leaving the user to spot the one they meant
        ("train.stpes", "config.train has no field 'stpes'; did you mean steps?"),
        ("trian.steps", "--config.trian.steps: config has no field 'trian'; did you mean train?"),
        ("model.n_heads", "config.model has no field 'n_heads'; did you mean n_head, n_kv_head or"),
        # a field of another section: these suggested its neighbours (batch_size; steps or
        # warmup_steps) or listed the section's fields
        ("train.block_size", "has no field 'block_size'; did you mean model.block_size or batch_"),
        ("model.batch_size", "did you mean train.batch_size, block_size or vocab_size?"),
        ("train.every_steps", "mean checkpoint.every_steps, eval.every_steps or log.every_steps?"),
        ("steps", "--config.steps: config has no field 'steps'; did you mean train.steps?"),
        ("mesh.batch", "config.mesh has no field 'batch'; did you mean mesh.rules.batch?"),
    ],
)
def test_a_misspelt_override_names_the_close_fields(path, words):
    with pytest.raises(ConfigError) as caught:
        check_override(small_config(), path)
    assert str(caught.value).startswith(f"--config.{path}: ") and words in str(caught.value)


MISSPELT_IN_FILE = """
from jaxpt.config import preset_config

def get_config(arg=None):
    config = preset_config("gpt", "smoke")
    config.{path} = {value!r}
    return config
"""


@pytest.mark.parametrize(
    "path, value, words",
    [
        ("train.lerning_rate", 1e-3, "train has no such field; the fields are"),
        ("train.block_size", 128, "train has no such field; did you mean model.block_size or"),
        ("mesh.rules.embd", ("tensor",), "mesh.rules has no such field; did you mean embed?"),
        ("model.n_heads", 4, "model has no such field; did you mean n_head, n_kv_head or"),
        ("steps", 5, "a run config has no such field; did you mean train.steps?"),
    ],
)
def test_a_field_a_config_file_misspells_is_one_sentence(path, value, words, tmp_path):
    """A config file is Python: a field it set that no run config has was never read (the
    run trained at the default learning rate, with the default rules)."""
    config_file = tmp_path / "mine.py"
    config_file.write_text(MISSPELT_IN_FILE.format(path=path, value=value))
    with pytest.raises(ConfigError) as caught:
        check_config_flags(["launch.py", f"--config={config_file}"])
    said = f"--config={config_file}: get_config sets {path}, but {words}"
    assert str(caught.value).startswith(said), str(caught.value)


@pytest.mark.parametrize(
    "path, words",
    [
        ("mesh.rules.batch[0]", "set the whole field, e.g. --config.mesh.rules.batch=\"('data', "),
        ("mesh.rules.layers[0]", 'set the whole field, e.g. --config.mesh.rules.layers="()".'),
        ("train.steps[0]", "set the whole field, e.g. --config.train.steps=2."),
    ],
)
def test_an_element_override_of_a_field_without_elements_is_one_sentence(path, words):
    """config_flags sets only a list's elements: each of these was an IndexError traceback."""
    with pytest.raises(ConfigError) as caught:
        check_override(small_config(), path)
    field = path.partition("[")[0]
    assert str(caught.value).startswith(f"--config.{path}: config.{field} has no elements to ")
    assert words in str(caught.value)


def run_launch(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--config=configs/gpt.py:smoke", "--config.train.nosuch=1"],
            "--config.train.nosuch: config.train has no field 'nosuch'; the fields are b1, b2,",
        ),
        # config_flags' IndexError traceback
        (
            ["--config=configs/gpt.py:smoke", "--config.mesh.rules.batch[0]=fsdp"],
            "config.mesh.rules.batch has no elements to set one by one; set the whole field",
        ),
        # "flag --config.train.steps=1e3: invalid literal for int() with base 10: '1e3'"
        (
            ["--config=configs/gpt.py:smoke", "--config.train.steps=1e3"],
            "--config.train.steps='1e3' is not a whole number; write one, e.g. "
            "--config.train.steps=200.",
        ),
        (["--config=configs/nosuch.py"], "--config=configs/nosuch.py: 'configs/nosuch.py' is not"),
        (
            ["--config=configs/gpt.py:smok"],
            "--config=configs/gpt.py:smok: config argument 'smok' is not one of ['smoke']; pass "
            "one of them after the file's colon (e.g. :smoke), or none.",
        ),
        (["--config=configs/gpt.py:smoke", "--workdir=a_file"], "is a file; choose another"),
        # trained in the current directory, beside the user's files
        (["--config=configs/gpt.py:smoke", "--workdir="], "--workdir is empty: name the run's"),
        # ignored: the run trained 200 steps without the override and exited 0
        (
            ["--config=configs/gpt.py:smoke", "config.train.steps=1"],
            "unexpected arguments 'config.train.steps=1'; pass each as --flag=value.",
        ),
        # jax's ValueError traceback: no coordinator outside a cluster
        (
            ["--config=configs/gpt.py:smoke", "--distributed"],
            "--distributed could not join a cluster",
        ),
        # AttributeError tracebacks: a file that is no preset
        # sampling flags another mode ignored
        (
            ["--config=configs/gpt.py:smoke", "--temperature=0.5"],
            "--temperature applies to --mode=generate and --mode=chat, not --mode=train; leave",
        ),
        (
            ["--config=configs/gpt.py:smoke", "--mode=chat", "--prompt=hi"],
            "--prompt applies to --mode=generate, not --mode=chat; leave it out.",
        ),
        (["--config=a_file"], "--config=a_file: 'a_file' is not a Python file; name a preset"),
        (["--config=no_get_config.py"], "'no_get_config.py' defines no get_config(arg); name"),
        (["--config=returns_a_dict.py"], "get_config did not return a run config with the"),
        # absl's CantOpenFlagFileError traceback, as config_flags defined --config on import
        (
            ["--config=configs/gpt.py:smoke", "--flagfile=nope.txt"],
            "--flagfile=nope.txt cannot be read (No such file or directory); name a file of",
        ),
    ],
    ids=[
        "unknown field",
        "tuple element",
        "not a number",
        "no such file",
        "bad config argument",
        "workdir is a file",
        "empty workdir",
        "positional argument",
        "distributed without a cluster",
        "a sampling flag in training",
        "a generate flag in chat",
        "config not python",
        "config without get_config",
        "config not a run config",
        "missing flagfile",
    ],
)
def test_launch_errors_are_one_sentence_and_exit_1(args, words, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "no_get_config.py").write_text("x = 1\n")
    (tmp_path / "returns_a_dict.py").write_text("def get_config(arg=None):\n    return {}\n")
    configs = tmp_path / "configs"
    configs.symlink_to(ROOT / "configs")
    result = run_launch("--workdir=run", *args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("launch.py: ") and words in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1  # one line: no traceback, no usage dump
    assert result.stderr.endswith((".\n", "?\n")), result.stderr  # absl's had no full stop
    assert (tmp_path / "a_file").read_text() == "not a directory"
    assert not (tmp_path / "run").exists()


def test_a_data_error_ends_launch_as_a_sentence(tmp_path):
    """The data layer's messages are clauses (other sentences quote them): launch.py printed a
    missing dataset's without its full stop."""
    smoke = str(ROOT / "configs" / "gpt.py") + ":smoke"
    result = run_launch(
        f"--config={smoke}", "--config.data.dataset=./nowhere", "--workdir=run", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.startswith("launch.py: data.dataset='./nowhere': "), result.stderr
    assert result.stderr.endswith(".\n") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("address", ["localhost", "localhost:", "localhost:http", "h:70000"])
def test_a_coordinator_address_without_a_port_is_one_sentence(address, monkeypatch):
    """jax split the address at its last ':' and raised an IndexError without one."""
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", address)
    with pytest.raises(ConfigError, match=f"JAX_COORDINATOR_ADDRESS='{address}' must be host:port"):
        launcher.init_distributed()


def test_a_coordinator_port_in_use_is_one_sentence(monkeypatch):
    """Process 0 could not start the coordinator on a taken port: jax segfaulted, or raised a
    JaxRuntimeError ('UNKNOWN: Failed to start RPC server')."""
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", f"localhost:{port}")
        monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
        monkeypatch.setenv("JAX_PROCESS_ID", "0")
        with pytest.raises(ConfigError, match=f"port {port} is in use on this host"):
            launcher.init_distributed()


@pytest.mark.parametrize("mode", launcher.MODES)
def test_a_distributed_run_checks_its_config_before_it_joins(mode, monkeypatch, tmp_path):
    """A bad field stopped each process only after every process had joined the cluster (a
    process started alone waited minutes for the others first); the check of
    sdpa_implementation='cudnn', which asks for the backend (jax refuses to join after
    that), comes after joining."""
    events = []
    monkeypatch.setattr(launcher, "init_distributed", lambda: events.append("join"))
    backend = jax.default_backend
    monkeypatch.setattr(jax, "default_backend", lambda: events.append("backend") or backend())
    config = small_config()
    config.train.steps = 0
    with pytest.raises(ConfigError, match=r"^train\.steps=0 must be"):
        launcher.run(config, workdir=str(tmp_path), mode=mode, distributed=True)
    assert events == []
    config = small_config()
    config.model.update(sdpa_implementation="cudnn", dtype="bfloat16")
    with pytest.raises(ConfigError, match="sdpa_implementation='cudnn' needs a GPU"):
        launcher.run(config, workdir=str(tmp_path), mode=mode, distributed=True)
    assert events == ["join", "backend"]


def test_help_matches_the_readme():
    """The flags the README's Chat paragraph lists say they serve chat (their help said
    generate only), and each command of the usage text is on its own lines (the chat example
    ran into one line with a gap)."""
    result = run_launch("--help")  # absl's usage, exit status 1
    readme = (ROOT / "README.md").read_text()
    chat = readme[readme.index("**Chat.** `--mode=chat`") :].split("\n\n")[0]
    chat_flags = re.findall(r"`--(\w+)`", chat)
    assert len(chat_flags) >= 6, chat_flags
    for flag in chat_flags:
        flag_help = re.search(rf"^  --{flag}: (.*)$", result.stdout, re.MULTILINE).group(1)
        assert "chat" in flag_help, (flag, flag_help)
    usage = result.stdout.split("flags:")[0]
    assert not re.search(r"\S {2,}--", usage), usage


USAGE_FILES = sorted(
    p.relative_to(ROOT)
    for pattern in ("launch.py", "configs/*.py", "bench/*.py", "jaxpt/**/*.py")
    for p in ROOT.glob(pattern)
)


@pytest.mark.parametrize("path", USAGE_FILES, ids=str)
def test_usage_texts_keep_each_command_on_its_lines(path):
    """A docstring's command continued with a bare backslash ran into one line with a gap in
    ``--help`` (``python -m jaxpt.data.prepare``'s chat example, ``bench/train_step.py``'s) and
    in ``__doc__``: Python joins the lines; ``\\`` keeps the backslash and the line break."""
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text())) or ""
    assert not re.search(r"\S {2,}--", doc), doc
