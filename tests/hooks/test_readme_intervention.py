"""The README's "How to add an intervention" example, executed from the README itself and
checked against plain Hugging Face with a PyTorch forward pre-hook (an independent oracle)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_factory():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    (code,) = [b for b in blocks if "def document_resid_zero_hooks" in b]
    namespace: dict = {}
    exec(compile(textwrap.dedent(code), str(README), "exec"), namespace)  # noqa: S102
    return namespace["document_resid_zero_hooks"]


def hf_oracle(hf, batch, layers):
    document = batch.mask("document")

    def zero_document(module, args, kwargs):
        if args:
            return (args[0] * ~document[..., None], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * ~document[..., None]}

    handles = [
        hf.bert.encoder.layer[layer].register_forward_pre_hook(zero_document, with_kwargs=True)
        for layer in layers
    ]
    try:
        with torch.no_grad():
            return hf(
                input_ids=batch.input_ids,
                token_type_ids=batch.token_type_ids,
                attention_mask=batch.attention_mask,
            ).logits[:, 0]
    finally:
        for h in handles:
            h.remove()


def test_readme_intervention_matches_hf_on_two_batches_of_one_shape(tiny):
    model, hf, _ = tiny
    hooks = readme_factory()(model, layers=[1])
    a = model.encode(["cat", "dog"], ["the cat runs in the big house", "a red fish"])
    b = model.encode(["what cat runs in", "dog"], ["the cat runs in", "a red fish"])
    assert a.input_ids.shape == b.input_ids.shape and not torch.equal(a.parts, b.parts)
    for batch in (a, b):
        expected = hf_oracle(hf, batch, [1])
        torch.testing.assert_close(model.score(batch, hooks=hooks), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(expected, model.score(batch), atol=1e-4)
