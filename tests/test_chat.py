"""Supervised fine-tuning and chat: conversations rendered as ids and a loss mask, the masked
loss, preparation of chat data, a tiny model fine-tuned on it answering in jaxpt.chat and in
``launch.py --mode=chat``."""

import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpt
from jaxpt import data, generation, hf, launcher, models, train
from jaxpt.config import load_config_file, preset_config
from jaxpt.data import _prepare as data_prepare
from jaxpt.errors import ConfigError, DataError
from jaxpt.generation import _recent_history

from .conftest import FAST_COMPILE, ROOT, run_in_repo, use_devices
from .test_generation import eof
from .test_multihost import free_port

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "See you."},
]


def pieces_to_ids_and_mask(tok, pieces: list[tuple[str, int]]) -> tuple[list, list]:
    """Hand-cut (text, mask) pieces -> ids and a mask, one id per character (char tokenizer)."""
    ids = [i for text, _ in pieces for i in tok.encode(text)]
    return ids, [m for text, m in pieces for _ in text]


def test_chatml_conversation_ids_and_mask():
    expected = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n", 0),
        ("<|im_start|>assistant\n", 0),
        ("Hello.<|im_end|>", 1),
        ("\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("See you.<|im_end|>", 1),
        ("\n", 0),
    ]
    tok = data.CharTokenizer.from_texts(text for text, _ in expected)
    assert data.chat_template(tok) == data.CHATML
    ids, mask = data.encode_chat(tok, CONVERSATION, data.CHATML)
    assert (ids, mask) == pieces_to_ids_and_mask(tok, expected)
    prompt = data.chat_prompt(tok, CONVERSATION[:4], data.CHATML)
    assert prompt == pieces_to_ids_and_mask(tok, expected[:4])[0]  # ... Bye? and assistant\n
    assert data.end_of_turn(tok, data.CHATML) == "<|im_end|>"


def test_each_trained_reply_ends_with_the_ids_chat_stops_at():
    # under GPT-2 BPE "Hello.<|im_end|>" was encoded whole, ".<" one token: a model trained on
    # it ended its replies in ids that chat's stop sequence, "<" "|" "im" ..., never matched, and
    # decoding ran on to max_new_tokens
    tok = data.get_tokenizer("gpt2")
    stop = tok.encode(data.end_of_turn(tok, data.CHATML))
    ids, mask = data.encode_chat(tok, CONVERSATION, data.CHATML)
    replies, reply = [], []
    for token, trained in zip([*ids, 0], [*mask, 0], strict=True):
        if trained:
            reply.append(token)
        elif reply:
            replies, reply = [*replies, reply], []
    assert [tok.decode(r) for r in replies] == ["Hello.<|im_end|>", "See you.<|im_end|>"]
    assert all(r[-len(stop) :] == stop for r in replies)
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
    assert tok.decode(ids) == chatml


def test_chat_keeps_the_turns_that_fit_the_block_plus_one():
    # generate takes prompt + max_new_tokens up to block_size + 1 (the last new token is never
    # fed back); chat left out a turn that fitted exactly
    tok = data.CharTokenizer.from_texts([string.printable])
    messages = CONVERSATION[:4]  # system, user, assistant, user
    whole = data.chat_prompt(tok, messages, data.CHATML)
    recent = data.chat_prompt(tok, messages[:1] + messages[3:], data.CHATML)
    cfg = models.config_from(tiny_config(block_size=len(whole) + 9).model)
    assert _recent_history(tok, messages, data.CHATML, cfg, 10) == whole
    assert _recent_history(tok, messages, data.CHATML, cfg, 11) == recent
    too_many = len(whole) + 10 - len(recent) + 1
    with pytest.raises(ConfigError, match=rf"model\.block_size \+ 1 = {len(whole) + 10}:"):
        _recent_history(tok, messages, data.CHATML, cfg, too_many)
    # where the system prompt and the last message fill the block, fewer new tokens do not help
    # (the default reply was 1 token, and the sentence said to ask for fewer)
    cfg = models.config_from(tiny_config(block_size=len(recent) - 1).model)
    with pytest.raises(ConfigError) as refused:
        generation.chat(None, cfg, tok, messages)
    assert str(refused.value) == (
        f"the last user message and the system prompt take {len(recent)} tokens, which leaves "
        f"no room for a reply in model.block_size = {len(recent) - 1}: shorten them."
    )


# A template unlike ChatML: a begin token, turns in <t>...</t>, a "role:" word, and a default
# system turn when the conversation has none.
TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<t>system: be kind</t>\n{% endif %}"
    "{% for m in messages %}<t>{{ m['role'] }}: {{ m['content'] }}</t>\n{% endfor %}"
    "{% if add_generation_prompt %}<t>assistant: {% endif %}"
)


def word_tokenizer(directory: Path) -> data.HFTokenizer:
    """A word-level tokenizer.json with special tokens <s>, <t>, </t> and TEMPLATE beside it."""
    import tokenizers

    words = ["[UNK]", "system:", "user:", "assistant:", "be", "kind", "hi", "there", "hello"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "<t>", "</t>"])  # ids 9, 10, 11
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</t>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return data.HFTokenizer(directory)


def test_template_from_tokenizer_file_ids_and_mask(tmp_path):
    tok = word_tokenizer(tmp_path)
    assert data.chat_template(tok) == TEMPLATE
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    ids, mask = data.encode_chat(tok, messages, TEMPLATE)
    # <s> <t> system: be kind </t> <t> user: hi there </t> <t> assistant: | hello </t> |
    assert ids == [9, 10, 1, 4, 5, 11, 10, 2, 6, 7, 11, 10, 3, 8, 11]
    assert mask == [0] * 13 + [1, 1]
    assert data.chat_prompt(tok, messages[:1], TEMPLATE) == ids[:13]
    assert data.end_of_turn(tok, TEMPLATE) == "</t>"


# meta-llama/Llama-2-7b-chat-hf's and mistralai/Mistral-7B-Instruct-v0.1's chat templates, as
# their tokenizer_config.json write them: the reply after " [/INST]" and before the end token
LLAMA_2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
MISTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)
E = data.EOT  # a char tokenizer's begin and end token
# a plain reading of each template: (text, trained) pieces of CONVERSATION (Mistral's: no system)
LLAMA_2_PIECES = [
    (f"{E}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST]", 0),
    (f" Hello. {E}", 1),
    (f"{E}[INST] Bye? [/INST]", 0),
    (f" See you. {E}", 1),
]
MISTRAL_PIECES = [
    (f"{E}[INST] Hi! [/INST]", 0),
    (f"Hello.{E}", 1),
    (" [INST] Bye? [/INST]", 0),
    (f"See you.{E}", 1),
    (" ", 0),
]


@pytest.mark.parametrize(
    "template, messages, expected",
    [
        (LLAMA_2_CHAT, CONVERSATION, LLAMA_2_PIECES),
        (MISTRAL_INSTRUCT, CONVERSATION[1:], MISTRAL_PIECES),
    ],
)
def test_llama_2_and_mistral_templates_train_and_chat_on_the_reply(template, messages, expected):
    # Llama-2's " reply </s>" was refused: "does not end an assistant's turn with a marker"
    tok = data.CharTokenizer.from_texts([string.printable + E])
    assert data.encode_chat(tok, messages, template) == pieces_to_ids_and_mask(tok, expected)
    assert data.end_of_turn(tok, template) == E
    reply = expected[-1 if expected[-1][1] else -2][0]  # what the model writes, then more
    completion = generation.Generated(
        tokens=jnp.asarray([tok.encode(reply + "[INST]")]),
        prompt_lengths=jnp.asarray([0]),
        lengths=jnp.asarray([len(reply) + 6]),
    )
    cfg = models.config_from(tiny_config(vocab_size=tok.vocab_size, block_size=128).model)
    fake = lambda *args, **kwargs: completion
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "generate", fake)
        assert jaxpt.chat(None, cfg, tok, messages[:-1], template=template) == "See you."


@pytest.mark.parametrize(
    "template, written",
    [
        (data.CHATML, "\n  See you.\n<|im_end|>"),  # the template adds no whitespace
        (LLAMA_2_CHAT, f" See you. {E}"),  # the template's own spaces around the reply
        (MISTRAL_INSTRUCT, f" See you.{E}"),  # Mistral writes none: the model's space
    ],
)
def test_chat_replies_are_as_written_and_render_back_to_what_was_written(template, written):
    """jaxpt.chat stripped the whitespace around every reply, so the next turn's prompt
    (the reply rendered as the assistant's turn) was not what the model wrote."""
    tok = data.CharTokenizer.from_texts([string.printable + E + "<|im_end|>"])
    messages = CONVERSATION[1:4]  # user, assistant, user
    prompt = data.chat_prompt(tok, messages, template)
    completion = generation.Generated(
        tokens=jnp.asarray([prompt + tok.encode(written + "[INST]")]),
        prompt_lengths=jnp.asarray([len(prompt)]),
        lengths=jnp.asarray([len(prompt) + len(written) + 6]),
    )
    cfg = models.config_from(tiny_config(vocab_size=tok.vocab_size, block_size=128).model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "generate", lambda *args, **kwargs: completion)
        reply = jaxpt.chat(None, cfg, tok, messages, template=template)
    assert tok.decode(completion.completions()[0]).startswith(written)
    turn = [*messages, {"role": "assistant", "content": reply}]
    rendered, _ = data.encode_chat(tok, turn, template)
    assert rendered[: len(prompt) + len(written)] == prompt + tok.encode(written)
    assert reply.strip() == "See you."  # whitespace aside, the reply's text


# ChatML with transformers' {% generation %} marker around the assistant's reply (templates
# written for return_assistant_tokens_mask)
GENERATION_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_chat_stops_decoding_at_an_end_of_turn_marker_of_several_tokens(monkeypatch):
    # a marker of several tokens (ChatML's under GPT-2 BPE) cut the reply's text, but
    # decoding ran on to max_new_tokens
    tok = data.CharTokenizer.from_texts([string.ascii_letters + "<|>_\n "])
    template = data.CHATML.replace("<|im_end|>", "<END>")  # each character once in the walk
    config = preset_config("bigram", "smoke")
    config.model.update(vocab_size=tok.vocab_size, block_size=128)
    cfg = models.config_from(config.model)
    table = np.full((tok.vocab_size, tok.vocab_size), -5.0, np.float32)
    walk = tok.encode("\nok<END>xx")  # the greedy walk from the assistant's prompt's "\n"
    table[walk[:-1], walk[1:]] = 5.0
    params = models.get("bigram").init(jax.random.key(0), cfg)
    params = eqx.tree_at(lambda p: p.table.weight, params, jnp.asarray(table))
    drawn, generate = [], generation.generate

    def recorded(*args, **kwargs):
        drawn.append(generate(*args, **kwargs).completions()[0])
        return generation.Generated(
            jnp.asarray([drawn[-1]]), jnp.asarray([0]), jnp.asarray([len(drawn[-1])])
        )

    monkeypatch.setattr(generation, "generate", recorded)
    messages = [{"role": "user", "content": "hi"}]
    assert jaxpt.chat(params, cfg, tok, messages, max_new_tokens=20, template=template) == "ok"
    assert tok.decode(drawn[0]) == "ok<END>"  # 7 new tokens of 20


def test_template_with_transformers_generation_marker_renders_as_transformers_does():
    # jaxpt's Jinja environment did not know the tag: "the chat template does not parse"
    templates = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = templates.render_jinja_template([CONVERSATION], chat_template=GENERATION_CHATML)
    text = rendered[0]
    tok = data.CharTokenizer.from_texts([text])
    ids, mask = data.encode_chat(tok, CONVERSATION, GENERATION_CHATML)
    assert tok.decode(ids) == text
    assert (ids, mask) == data.encode_chat(tok, CONVERSATION, data.CHATML)


def test_tojson_takes_the_options_transformers_gives_it():
    # tojson took `indent` alone: sort_keys or separators raised a TypeError (a traceback)
    templates = pytest.importorskip("transformers.utils.chat_template_utils")
    template = (
        "{% for m in messages %}{{ m | tojson(separators=(',', ':'), sort_keys=True) }}\n"
        "{% endfor %}"
    )
    rendered, _ = templates.render_jinja_template([CONVERSATION[:3]], chat_template=template)
    assert rendered[0].startswith('{"content":"Be brief.","role":"system"}\n')
    tok = data.CharTokenizer.from_texts(rendered)
    ids, _ = data.encode_chat(tok, CONVERSATION[:3], template)
    assert tok.decode(ids) == rendered[0]


# Llama 3.1's and 3.2's system header (today's date where the renderer gives strftime_now,
# else a fixed one) and Mistral Small 3's (which calls it unconditionally)
DATED_TEMPLATES = [
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{{ 'Today Date: ' + date_string + '\\n' }}" + data.CHATML,
    "{%- set today = strftime_now('%Y-%m-%d') %}{{ 'Today: ' + today + '\\n' }}" + data.CHATML,
]


@pytest.mark.parametrize("template", DATED_TEMPLATES)
def test_templates_dated_with_strftime_now_render_as_transformers_does(template):
    # jaxpt's renderer lacked transformers' strftime_now: Llama 3's template wrote its fallback
    # date, Mistral Small 3's was refused ("'strftime_now' is undefined")
    templates = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = templates.render_jinja_template([CONVERSATION[:3]], chat_template=template)
    tok = data.CharTokenizer.from_texts([string.printable + "<|>_"])
    ids, _ = data.encode_chat(tok, CONVERSATION[:3], template)
    assert tok.decode(ids) == rendered[0]


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    rewriting = "{% for m in messages %}{{ m['content'] if loop.last else '' }}{% endfor %}"
    tok = word_tokenizer(tmp_path)
    with pytest.raises(data.DataError, match="prefixes of the whole"):
        data.encode_chat(tok, CONVERSATION, rewriting)


def tiny_config(vocab_size: int = 32, block_size: int = 24):
    config = preset_config("gpt", "smoke")
    config.model.update(vocab_size=vocab_size, block_size=block_size, n_layer=1)
    return config


def test_masked_loss_is_the_mean_over_assistant_tokens_with_or_without_accumulation():
    config = tiny_config()
    cfg = models.config_from(config.model)
    tx = train.optimizer(config.train, models.get("gpt").init(jax.random.key(0), cfg))
    state = train.init_state(jax.random.key(0), cfg, tx)
    tokens = jax.random.randint(jax.random.key(1), (4, 25), 0, 32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = np.zeros((4, 24), np.int32)
    mask[0, 2:], mask[1, 20:], mask[3, 5:7] = 1, 1, 1  # micro-batches (rows 0, 2 | 1, 3): 22 | 6
    results = []
    for accum in (1, 2):
        config.train.grad_accum_steps = accum
        step = jax.jit(train.make_train_step(config, tx))
        results.append(step(state, inputs, targets, jnp.asarray(mask)))
    (_, m1), (_, m2) = results

    apply = jax.jit(models.get("gpt").apply, static_argnames="cfg")
    logits = np.asarray(apply(state.params, inputs, cfg)[0], np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose([m1["ce"], m2["ce"]], [nll[mask == 1].mean()] * 2, rtol=1e-5)
    assert float(m1["loss_tokens"]) == float(m2["loss_tokens"]) == mask.sum()
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    # (the params after this first step, at the warmup's lr 0, are the initial ones either way:
    # tests/test_train.py compares accumulated masked gradients with the whole batch's)


# ----------------------------------------------------------------------------- fine-tuning

TOY = [  # what a tiny model learns by heart; the system prompt changes the answer
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
    ],
]
CONFIG_FILE = """
from jaxpt.config import preset_config


def get_config():
    config = preset_config("gpt", "smoke")
    config.model.update(vocab_size=32, block_size=127, n_layer=1)
    config.data.update(dataset={data!r}, tokenizer="char")
    config.train.update(steps=40, batch_size=8, lr=1e-2, warmup_steps=5)
    config.checkpoint.every_steps = 1000
    config.eval.update(every_steps=1000, batches=1)
    config.log.every_steps = 1000
    return config
"""


def prepare_toy(
    directory: Path, out: Path, repeats: int, rows_per_shard: int, block_size: int = 127, **kw
):
    """TOY repeated `repeats` times as jsonl in `directory`, prepared as chat data in `out`
    (character tokenizer, rows of `block_size` + 1 tokens)."""
    with open(directory / "toy.jsonl", "w") as f:
        for _ in range(repeats):
            for messages in TOY:
                f.write(json.dumps({"messages": messages}) + "\n")
    return data.prepare_dataset(
        str(directory / "toy.jsonl"),
        out,
        format="chat",
        tokenizer="char",
        block_size=block_size,
        shard_tokens=rows_per_shard * (block_size + 1) + 5,  # rounded down to whole rows
        workers=1,
        progress=False,
        **kw,
    )


def test_chat_preparation_resumes_and_repairs_its_masks(tmp_path):
    reference = prepare_toy(tmp_path, tmp_path / "reference", repeats=8, rows_per_shard=4)
    out = tmp_path / "out"
    prepare_toy(tmp_path, out, repeats=8, rows_per_shard=4, max_tokens=8 * 128)  # 2 shards
    (out / "train_000001.mask.bin").write_bytes(b"")  # damaged: the shard is written again
    manifest = prepare_toy(tmp_path, out, repeats=8, rows_per_shard=4)
    assert manifest.shards == reference.shards and len(manifest.shards) == 6
    for shard in manifest.shards:
        for name in (shard.file, shard.file.replace(".bin", ".mask.bin")):
            assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_conversations_whose_replies_lie_beyond_the_block_name_block_size(tmp_path):
    # each prompt alone, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", is 52
    # characters: rows of 33 hold no reply, and prepare said the dataset was empty (no text)
    assert len("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n") == 52
    with pytest.raises(data.DataError, match=r"none of the 3 conversations .* raise --block_s"):
        prepare_toy(tmp_path, tmp_path / "out", repeats=1, rows_per_shard=4, block_size=32)
    assert not (tmp_path / "out").exists()


def test_prepare_counts_the_conversations_it_kept_and_skipped(tmp_path):
    # configs/smollm_sft.py sets train.steps from the conversations prepare prints; it printed
    # the conversations read, the skipped ones too
    def prompt(messages):  # ChatML up to the assistant's reply, as plain python writes it
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    assert [len(prompt(m[:-1])) for m in TOY] == [52, 53, 90]  # rows of 64: TOY[2] skipped
    manifest = prepare_toy(tmp_path, tmp_path / "out", repeats=2, rows_per_shard=1, block_size=63)
    assert manifest.documents == 6 and manifest.tokens() == 4 * 64
    assert "256 uint16 tokens (val 64, train 192) from 4 conversations, one per row (2 more " in (
        data_prepare.summary(manifest)
    )


def test_data_all_in_the_val_split_names_a_shard_size_of_whole_rows_that_splits_it(tmp_path):
    # the advice was a tenth of the tokens, --shard_tokens=38, which chat data refuses (less
    # than a row of 128)
    manifest = prepare_toy(tmp_path, tmp_path / "out", repeats=1, rows_per_shard=4)
    advice = data.missing_split(manifest, "train")
    assert "--shard_tokens=128 " in advice  # 3 rows: a tenth, at least one row
    kw = dict(format="chat", tokenizer="char", block_size=127, workers=1, progress=False)
    split = data.prepare_dataset(
        str(tmp_path / "toy.jsonl"), tmp_path / "split", **kw, shard_tokens=128
    )
    assert (split.tokens("val"), split.tokens("train")) == (128, 256)
    with open(tmp_path / "one.jsonl", "w") as f:
        f.write(json.dumps({"messages": TOY[0]}) + "\n")
    one = data.prepare_dataset(
        str(tmp_path / "one.jsonl"), tmp_path / "one", **kw, shard_tokens=128
    )
    assert data.missing_split(one, "train").endswith("conversation); prepare more conversations")


def test_too_few_conversations_for_a_batch_name_the_batch_size_alone(tmp_path):
    # the advice named model.block_size too, which chat data's rows fix (the loader refuses
    # any other)
    manifest = prepare_toy(tmp_path, tmp_path / "out", repeats=1, rows_per_shard=1)
    assert manifest.tokens("train") == 2 * 128
    with pytest.raises(data.DataError, match=r"2 windows of 128: .* lower train\.batch_size, or"):
        data.Loader(manifest, "train", 4, 127).init_state()
    assert data.Loader(manifest, "train", 2, 127).init_state()["step"] == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_conversation_the_template_refuses_is_named_by_its_row(tmp_path, workers):
    # the template's message alone, as Llama-2's "Conversation roles must alternate ...", left
    # the conversation to be found among thousands
    word_tokenizer(tmp_path)
    refusing = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = refusing + TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [CONVERSATION[1:3]] * 70  # a worker's batch is 64 conversations
    rows[66] = CONVERSATION
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": messages}) + "\n" for messages in rows)
    with pytest.raises(DataError) as error:
        data.prepare_dataset(
            str(tmp_path / "d.jsonl"),
            tmp_path / "out",
            format="chat",
            tokenizer=str(tmp_path / "tokenizer.json"),
            block_size=31,
            shard_tokens=32 * 1000,
            workers=workers,
            progress=False,
        )
    assert str(error.value) == (
        f"row 66 of dataset {tmp_path / 'd.jsonl'}: the chat template refused the "
        "conversation: no system"
    )


@pytest.mark.parametrize(
    ("line", "why"),
    [('{"messages": [', "column 15: Expecting value"), ('["hi", "hello"]', "it is an array")],
)
def test_a_jsonl_line_that_is_no_record_is_named_by_its_file_and_line(tmp_path, line, why):
    # the sentence named the directory and pyarrow's parse error alone, without the file or
    # the line: one line among a corpus's files was left to be found by hand
    source = tmp_path / "conversations"
    source.mkdir()
    good = [json.dumps({"messages": messages}) for messages in TOY]
    (source / "a.jsonl").write_text("\n".join(good * 4) + "\n")
    (source / "b.jsonl").write_text("\n".join([*good, "", line, *good]) + "\n")
    kw = dict(format="chat", tokenizer="char", block_size=127, workers=1, progress=False)
    with pytest.raises(DataError) as error:
        data.prepare_dataset(str(source), tmp_path / "out", shard_tokens=128 * 4, **kw)
    assert str(error.value).startswith(
        f"could not read dataset {str(source)!r}: {source / 'b.jsonl'}, line 5 is not a JSON "
        f"object ({why}"
    )
    assert str(error.value).endswith("; fix that line or remove it")


def test_a_bad_first_line_is_named_and_a_json_document_is_not(tmp_path):
    """A file whose first line is no record is read whole, to tell a JSON document over many
    lines (a list of records, not named) from JSON lines cut off at their first line."""
    source = tmp_path / "conversations"
    source.mkdir()
    (source / "a.json").write_text(json.dumps([{"messages": m} for m in TOY], indent=1))
    (source / "b.jsonl").write_text('{"messages": [\n' + json.dumps({"messages": TOY[0]}))
    kw = dict(format="chat", tokenizer="char", block_size=127, workers=1, progress=False)
    with pytest.raises(DataError, match=re.escape(f"{source / 'b.jsonl'}, line 1 is not a JSON")):
        data.prepare_dataset(str(source), tmp_path / "out", shard_tokens=128 * 4, **kw)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A tiny model fine-tuned on TOY, repeated: (config file, workdir, manifest)."""
    root = tmp_path_factory.mktemp("sft")
    # 72 conversations; the val split is the first 8
    manifest = prepare_toy(root, root / "data", repeats=24, rows_per_shard=8)
    config_file = root / "sft.py"
    config_file.write_text(CONFIG_FILE.format(data=str(root / "data")))
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_devices(monkeypatch, 2)  # data parallel over two devices, not eight: faster
        train.train(load_config_file(str(config_file)), root / "run")
    return config_file, root / "run", manifest


def test_chat_data_rows_hold_one_conversation_and_its_mask(fine_tuned):
    _, _, manifest = fine_tuned
    tok = data.tokenizer_for(manifest)
    assert manifest.row_tokens == 128 and manifest.documents == 72
    batch = next(data.Loader(manifest, "val", 3, 127).eval_batches(1))
    for row, (tokens, mask) in enumerate(zip(batch.tokens, batch.loss_mask, strict=True)):
        ids, expected_mask = data.encode_chat(tok, TOY[row], data.CHATML)
        padding = 128 - len(ids)
        assert tokens.tolist() == ids + [tok.eot_id] * padding
        assert mask.tolist() == expected_mask + [0] * padding


def test_fine_tuned_model_answers_in_jaxpt_chat(fine_tuned):
    config_file, workdir, manifest = fine_tuned
    config = load_config_file(str(config_file))
    records = train.read_metrics(workdir / "metrics.jsonl")
    assert "loss_tokens" in records[0]
    assert [r["val_ce"] for r in records if "val_ce" in r][-1] < 0.05
    _, params = train.latest_params(config, workdir)
    cfg, tok = models.config_from(config.model), data.tokenizer_for(manifest)
    for messages in TOY[:2]:  # the answer follows the question (TOY[2]: launch.py's test)
        reply = jaxpt.chat(params, cfg, tok, messages[:-1], max_new_tokens=20)
        assert reply == messages[-1]["content"]


def test_launch_chat_answers_and_exits_on_end_of_input(fine_tuned):
    config_file, workdir, _ = fine_tuned
    result = run_in_repo(
        [
            sys.executable,
            "launch.py",
            f"--config={config_file}",
            f"--workdir={workdir}",
            "--mode=chat",
            "--system_prompt=be brief",
            "--temperature=0",
            "--max_new_tokens=20",
        ],
        input="hi\n",
    )
    assert result.returncode == 0, result.stderr
    assert "> hey\n" in result.stdout


def test_launch_chat_of_two_processes_reads_process_0s_terminal(fine_tuned):
    """Under --distributed every process read its own stdin: one whose stdin is empty (a
    SLURM task's but the first) ended its chat at once, and process 0 waited for it in its
    reply's collectives (params sharded over both) until killed."""
    config_file, workdir, _ = fine_tuned
    port = free_port()
    hosts = []
    for index in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(index),
        )
        args = [sys.executable, "launch.py", f"--config={config_file}", f"--workdir={workdir}"]
        args += ["--mode=chat", "--distributed", "--system_prompt=be brief", "--temperature=0"]
        args += ["--max_new_tokens=20", "--config.mesh.dcn_data=1", "--config.mesh.dcn_fsdp=2"]
        stdin = subprocess.PIPE if index == 0 else subprocess.DEVNULL  # a terminal for one
        hosts.append(subprocess.Popen(args, cwd=ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE))
    try:
        first = hosts[0].communicate(b"hi\n", timeout=120)[0].decode()
        other = hosts[1].communicate(timeout=60)[0].decode()
    finally:
        for host in hosts:
            host.kill()
    assert [host.returncode for host in hosts] == [0, 0]
    assert "> hey\n" in first  # as one process answers (the test above)
    assert "> " not in other and "chat:" not in other  # process 0 alone reads and prints


def test_ctrl_c_while_a_reply_is_drawn_ends_the_chat(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the reply's prefill or decoding

    config = preset_config("bigram", "smoke")
    chatml = "<|im_start|>system\nuser\nassistant\n<|im_end|>hi"  # every character ChatML uses
    monkeypatch.setattr(
        launcher, "params_and_tokenizer", lambda *_: (None, data.CharTokenizer.from_texts([chatml]))
    )
    monkeypatch.setattr(launcher, "chat", interrupted)
    typed = iter(["hi"])  # then Ctrl-D: the chat ends either way, never waits

    def read(prompt):
        if (line := next(typed, None)) is None:
            pytest.fail("the chat read on after Ctrl-C while a reply was drawn")
        return line

    monkeypatch.setattr("builtins.input", read)
    try:
        launcher.converse(config, "unused", launcher.SampleOptions())  # returns: status 0
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail("Ctrl-C while a reply was drawn left converse with a traceback")
    out, err = capsys.readouterr()
    assert out.endswith("conversation\n\n") and err == ""


def test_a_message_the_model_cannot_take_is_left_out_and_the_chat_goes_on(monkeypatch, capsys):
    tok = data.CharTokenizer.from_texts([string.ascii_lowercase + "<|>_\n "])  # no digits
    config = preset_config("bigram", "smoke")
    config.model.update(vocab_size=tok.vocab_size, block_size=128)
    params = models.get("bigram").init(jax.random.key(0), models.config_from(config.model))
    monkeypatch.setattr(launcher, "params_and_tokenizer", lambda *_: (params, tok))
    asked, replies = [], []

    def chat(*args, **kwargs):
        asked.append(args[3])
        replies.append(jaxpt.chat(*args, **kwargs))
        return replies[-1]

    monkeypatch.setattr(launcher, "chat", chat)
    typed = iter(["x" * 100, "hi 2", "hi"])  # too long for the block; a digit; fine

    def read(prompt):
        if (line := next(typed, None)) is None:
            raise EOFError  # Ctrl-D
        return line

    monkeypatch.setattr("builtins.input", read)
    launcher.converse(config, "unused", launcher.SampleOptions(max_new_tokens=4, temperature=0))
    out, err = capsys.readouterr()
    refused = err.strip().splitlines()
    assert len(refused) == 2 and all(line.endswith("(message left out)") for line in refused)
    assert "no room for a reply in model.block_size = 128" in refused[0] and "'2'" in refused[1]
    assert asked[-1] == [{"role": "user", "content": "hi"}]  # the refused ones left out
    assert out.endswith(f"conversation\n{replies[-1]}\n\n")  # the one reply, then the end
    # jaxpt.chat's own default fits any block: half of it (here 64 of 128), at most 256
    cfg = models.config_from(config.model)
    assert len(jaxpt.chat(params, cfg, tok, asked[-1])) == 64  # init params: no marker drawn
    # what would refuse every message is refused before the first is read
    with pytest.raises(DataError, match="character '2' is not in the char vocabulary"):
        launcher.converse(config, "unused", launcher.SampleOptions(system_prompt="be 2"))
    long = "be brief " * 12  # with even an empty message, more ChatML than the block
    empty = f"<|im_start|>system\n{long}<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
    n = len(empty + "<|im_start|>assistant\n")  # one character a token
    refusal = f"--system_prompt takes {n} tokens .*model.block_size = 128"
    with pytest.raises(ConfigError, match=refusal):
        launcher.converse(config, "unused", launcher.SampleOptions(system_prompt=long))


def test_readme_system_prompt_leaves_the_smoke_chat_room_to_reply(monkeypatch, capsys):
    """README's chat command with configs/smollm_sft.py:smoke (block 64, ChatML under GPT-2
    BPE): the default reply of half the block left no room for the system prompt and any
    message, so every message was refused. The default now takes what the block leaves."""
    config = load_config_file(f"{ROOT / 'configs' / 'smollm_sft.py'}:smoke")
    tok = data.run_tokenizer(config.data)
    monkeypatch.setattr(launcher, "params_and_tokenizer", lambda *_: (None, tok))
    asked = []

    def fake_generate(params, prompts, cfg, *, max_new_tokens, **kwargs):
        asked.append((prompts[0], max_new_tokens))
        reply = prompts[0] + tok.encode("Hello.<|im_end|>")
        lengths = [[len(prompts[0])], [len(reply)]]
        return generation.Generated(jnp.asarray([reply]), *map(jnp.asarray, lengths))

    monkeypatch.setattr(generation, "generate", fake_generate)
    typed = iter(["Hi, who are you?"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed, None) or eof())
    system = "You are a helpful assistant."  # README's
    launcher.converse(config, "unused", launcher.SampleOptions(system_prompt=system))
    out, err = capsys.readouterr()
    assert err == "" and out.endswith("conversation\nHello.\n\n")
    [(prompt, new_tokens)] = asked
    assert tok.decode(prompt) == (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi, who are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert len(prompt) + new_tokens == config.model.block_size + 1  # all the block leaves
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Hi, who are you?"},
    ]
    assert jaxpt.chat(None, models.config_from(config.model), tok, messages) == "Hello."
    assert asked[-1] == (prompt, new_tokens)  # jaxpt.chat's own default likewise


def test_prepare_warns_when_chat_could_not_use_the_template(tmp_path, caplog):
    """A template with no end-of-turn marker after a reply trains, but chat refuses it: prepare
    says so before the hours of training, not chat after them."""
    word_tokenizer(tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    args = str(tmp_path / "d.jsonl"), str(tmp_path), None, "train", "messages", 32
    data_prepare.chat_source(*args)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # TEMPLATE ends with </t>
    config = {
        "bos_token": "<s>",
        "eos_token": "</t>",
        "chat_template": TEMPLATE.replace("</t>", ""),
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    data_prepare.chat_source(*args)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].endswith("can be sampled but not chatted with")
    assert "does not end an assistant's turn with a marker" in warnings[0]


def test_fine_tuning_init_from_on_data_of_another_tokenizer_is_refused(tmp_path):
    """checkpoint.init_from ships its tokenizer.json; chat data prepared with another HF
    tokenizer (of the same kind, so data.tokenizer=<the checkpoint> passed) was fine-tuned on,
    silently: ids that mean other text to the model. Data of its own tokenizer trains."""
    from .test_data_tokenizers import build_hf_tokenizer

    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": TOY[0]}) + "\n")
    config = tiny_config(vocab_size=512, block_size=127)
    cfg = models.config_from(config.model)
    params = models.get(cfg.name).init(jax.random.key(0), cfg)
    own = data.HFTokenizer(build_hf_tokenizer(tmp_path / "own", eos="</s>"))
    init_from = hf.save_pretrained(params, cfg, tmp_path / "hf", tokenizer=own)
    config.checkpoint.init_from = str(init_from)
    config.data.tokenizer = str(init_from)
    for name, tokenizer in [("words", word_tokenizer(tmp_path)), ("own", own)]:
        data.prepare_dataset(
            str(tmp_path / "d.jsonl"),
            tmp_path / f"data-{name}",
            format="chat",
            tokenizer=str(tokenizer.path),
            block_size=127,
            shard_tokens=128,
            workers=1,
            progress=False,
        )
    config.data.dataset = str(tmp_path / "data-words")
    with pytest.raises(
        ConfigError,
        match=rf"^checkpoint\.init_from={init_from} comes with another tokenizer .* "
        rf"--tokenizer={init_from / 'tokenizer.json'}, .*\)\.$",
    ):
        launcher.pretrained_params(config, tmp_path / "run")
    config.data.dataset = str(tmp_path / "data-own")
    assert callable(launcher.pretrained_params(config, tmp_path / "run"))
