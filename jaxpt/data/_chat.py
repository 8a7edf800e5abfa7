"""Conversations as token ids and a loss mask: chat templates (Jinja, as Hugging Face writes
them in tokenizer_config.json) and ChatML, the template of the original JaxPT and SmolLM.

A conversation is a list of messages ``{"role": ..., "content": ...}``. The template renders
it to text; what an assistant turn adds after the generation prompt (``<|im_start|>assistant\\n``
in ChatML), less trailing whitespace, is the part a model learns to write: the reply and its
end-of-turn marker (``<|im_end|>``). To find that part, each turn is rendered as the
conversation up to it, so a template must render a conversation's turns as prefixes of the
whole (ChatML, SmolLM's, Llama 3's and most others do). The text is encoded piece by piece at
those boundaries, the same way for training rows (`encode_chat`) and chat prompts
(`chat_prompt`), so a model sees at inference exactly the ids it was trained on.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime

import jinja2
import numpy as np
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxpt.data._tokenizers import EOT, HFTokenizer, Tokenizer
from jaxpt.errors import DataError

# ChatML (the original JaxPT's `chatml.py`; SmolLM-Instruct's template without its default
# system prompt).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ASSISTANT = "assistant"
_PROBE = [{"role": "user", "content": "?"}, {"role": ASSISTANT, "content": "!"}]

Message = dict  # {"role": str, "content": str}


def chat_template(tok: Tokenizer) -> str:
    """The tokenizer's own chat template (tokenizer_config.json's), else ChatML."""
    if isinstance(tok, HFTokenizer) and tok.chat_template:
        return tok.chat_template
    return CHATML


def _special_tokens(tok: Tokenizer | None) -> dict[str, str]:
    """The names templates use for the tokenizer's begin / end tokens (None: a tokenizer
    being built, char or GPT-2: "<|endoftext|>")."""
    if isinstance(tok, HFTokenizer):
        return {"bos_token": tok.bos or "", "eos_token": tok.eot}
    return {"bos_token": EOT, "eos_token": EOT}


def plain_text(template: str, messages: Sequence[Message]) -> str:
    """The text of a conversation for a tokenizer without special tokens (its characters make
    a char vocabulary)."""
    return render(template, messages, _special_tokens(None), generation_prompt=True)


def _strftime_now(format: str) -> str:
    """transformers' `strftime_now`: the local time now in `format` (Llama 3's "Today Date")."""
    return datetime.now().strftime(format)


def _raise(message: str) -> None:
    raise DataError(f"the chat template refused the conversation: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson` filter: JSON without HTML escapes, with json.dumps' options."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``, transformers' marker of the assistant's
    text (for its assistant masks): renders what it encloses, as transformers does."""

    tags = frozenset({"generation"})

    def parse(self, parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


@functools.cache
def _compiled(template: str):
    """The template compiled as transformers compiles chat templates (sandboxed, trimmed, with
    its filters and functions)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise DataError(f"the chat template does not parse as Jinja ({e})") from None


def render(
    template: str, messages: Sequence[Message], special: dict, generation_prompt: bool
) -> str:
    """The template's text of `messages`, with the assistant's prompt after it if asked."""
    try:
        return _compiled(template).render(
            messages=list(messages), add_generation_prompt=generation_prompt, **special
        )
    except jinja2.TemplateError as e:
        raise DataError(f"the chat template cannot render a conversation ({e})") from None


def check_messages(messages, where: str) -> list[Message]:
    """`messages` as a list of {"role", "content"} strings; DataError naming `where` if not."""
    valid = isinstance(messages, Sequence) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not valid:
        raise DataError(
            f"{where} is not a conversation: it must be a list of messages "
            '{"role": <text>, "content": <text>}'
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _after(done: str, text: str) -> str:
    """What `text` adds to `done`, its prefix."""
    if not text.startswith(done):
        raise DataError(
            "the chat template does not render a conversation's turns as prefixes of the whole "
            "(it rewrites earlier turns), so the assistant's tokens cannot be told apart; use "
            "a tokenizer whose template does, or none (ChatML)"
        )
    return text[len(done) :]


def chat_segments(
    template: str, messages: Sequence[Message], special: dict, generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces; trained pieces are the
    assistant's replies with their end-of-turn marker. With `generation_prompt` the last
    piece ends with the assistant's prompt: the pieces a reply to `messages` is trained after."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        prompt = render(template, messages[:i], special, generation_prompt=True)
        turn = render(template, messages[: i + 1], special, generation_prompt=False)
        pieces.append((_after(done, prompt), False))
        reply = _after(prompt, turn)
        trained = reply.rstrip()
        pieces += [(trained, True), (reply[len(trained) :], False)]
        done = turn
    end = render(template, messages, special, generation_prompt)
    pieces.append((_after(done, end), False))
    return [(text, trained) for text, trained in pieces if text]


def encode_chat(
    tok: Tokenizer, messages: Sequence[Message], template: str, generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids (N,) of a conversation and their loss mask (N,): 1 on the assistant's
    replies and their end-of-turn marker, 0 elsewhere (`chat_segments`). A reply and its
    marker are encoded apart, so that every reply ends in the marker's own ids, at which chat
    stops (GPT-2's BPE wrote "Hello.<|im_end|>" with a token ".<")."""
    ids, mask = [], []
    special = _special_tokens(tok)
    end = _end_marker(template, tuple(special.items()))
    for text, trained in chat_segments(template, messages, special, generation_prompt):
        for part in _marker_apart(text, end) if trained else [text]:
            piece = tok.encode(part)
            ids += piece
            mask += [int(trained)] * len(piece)
    return ids, mask


@functools.cache  # a constant of the preparation, which encodes every conversation with it
def _end_marker(template: str, special: tuple[tuple[str, str], ...]) -> str | None:
    """The template's end-of-turn marker (`_turn_frame`) rendered with the `special` token
    names' items, or None where it writes none."""
    try:
        return _turn_frame(template, dict(special))[2]
    except DataError:
        return None


def _marker_apart(reply: str, end: str | None) -> list[str]:
    """`reply` as [text, `end`] where it ends with the marker `end`, else [reply]."""
    if not end or not reply.endswith(end):
        return [reply]
    return [reply[: -len(end)], end]


def chat_prompt(tok: Tokenizer, messages: Sequence[Message], template: str) -> list[int]:
    """Token ids of `messages` followed by the assistant's generation prompt: the ids a
    reply to them follows in a training row."""
    return encode_chat(tok, messages, template, generation_prompt=True)[0]


def end_of_turn(tok: Tokenizer, template: str) -> str:
    """The text that ends an assistant's turn (``<|im_end|>`` in ChatML, ``</s>`` in Llama-2's
    and Mistral's), less the whitespace around it, found by rendering a probe conversation.
    The reply may start with whitespace (Llama-2 writes ``[/INST] reply </s>``)."""
    return _turn_frame(template, _special_tokens(tok))[2]


def reply_in(tok: Tokenizer, template: str, written: str) -> str:
    """The reply in ``written``, the text a model wrote after the assistant's prompt: the
    text before the end-of-turn marker, as written but for the whitespace the template
    itself puts before a reply and before its marker (the spaces of Llama-2's ``[/INST]
    reply </s>``), so that the reply, rendered as the assistant's turn, is what was written."""
    before, between, end = _turn_frame(template, _special_tokens(tok))
    return written.partition(end)[0].removeprefix(before).removesuffix(between)


def _turn_frame(template: str, special: dict) -> tuple[str, str, str]:
    """What the template writes around a reply after the assistant's prompt, from a probe
    conversation rendered with the `special` token names: (whitespace before the reply,
    whitespace between it and the marker, the end-of-turn marker); DataError when no marker
    follows the reply."""
    prompt = render(template, _PROBE[:1], special, generation_prompt=True)
    turn = render(template, _PROBE, special, generation_prompt=False)
    before, found, after = _after(prompt, turn).partition(_PROBE[1]["content"])
    end = after.strip()
    if before.strip() or not found or not end:
        raise DataError(
            "the chat template does not end an assistant's turn with a marker after the reply, "
            "so a chat cannot tell where a reply stops"
        )
    return before, after[: len(after) - len(after.lstrip())], end


def chat_row(
    tok: Tokenizer, messages: Sequence[Message], template: str, row_tokens: int, dtype: str
) -> np.ndarray:
    """One training row (2, row_tokens): ids, then loss mask, cut to `row_tokens` and padded
    with end-of-text (mask 0); (2, 0) when no assistant token is left to learn (the first
    token of a row is never a target)."""
    ids, mask = encode_chat(tok, messages, template)
    ids, mask = ids[:row_tokens], mask[:row_tokens]
    if not any(mask[1:]):
        return np.empty((2, 0), dtype)
    pad = row_tokens - len(ids)
    return np.array([ids + [tok.eot_id] * pad, mask + [0] * pad], dtype)
