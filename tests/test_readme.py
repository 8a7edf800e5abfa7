"""The README's Python examples run as a user copies them, one block after another."""

import dataclasses
import re

import numpy as np

from jaxpt import models
from jaxpt.models import _registry
from tests.test_train import ROOT


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README's section under the line ``heading``, up to the next
    heading of any level."""
    readme = (ROOT / "README.md").read_text()
    section = re.split(r"\n#+ ", readme.split(f"\n{heading}\n", 1)[1], maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_library_and_generation_examples_run_in_turn(monkeypatch):
    """The Generation block called ``jaxpt.generate`` with ``jaxpt`` never imported: copied
    after the Using the library block, it stopped in a NameError. The blocks run as written on
    their preset with a 4096-token vocabulary (drawing and sampling over 50304 rows took about
    a third of the test's time)."""
    name = "gqa_glu_rope_gpt"
    preset = models.get(name)
    small = dataclasses.replace(preset, config=dataclasses.replace(preset.config, vocab_size=4096))
    monkeypatch.setitem(_registry._REGISTRY, name, small)
    (library,) = python_blocks("### Using the library")
    (generation,) = python_blocks("## Generation")
    namespace = {}
    exec(library, namespace)
    exec(generation, namespace)
    cfg, logits, loss = namespace["cfg"], namespace["logits"], namespace["loss"]
    assert cfg.name == name and logits.shape == (2, 128, 4096)
    assert np.isfinite(float(loss))
    completions = namespace["out"].completions()
    assert len(completions) == 2
    assert all(1 <= len(c) <= 50 for c in completions)
