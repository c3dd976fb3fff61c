"""Hugging Face transformers models on flexattn through their own flex_attention path (issue #18).

Small random-initialised models (Llama and Qwen2 configs; Qwen2 with sliding-window layers beside
full ones), full and left-padded batches (padding not a multiple of the block size): logits and
gradients through ``attn_implementation="flex_attention"`` with :func:`use_flexattn` equal those of
``attn_implementation="eager"``. transformers wraps flex_attention in torch.compile, so this is the
compiled path, called again with new masks (new closures) for the second batch.
"""

from __future__ import annotations

import os

import pytest
import torch

import flexattn

transformers = pytest.importorskip("transformers")

from flexattn.integrations.transformers import use_flexattn  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py

VOCAB, LENGTH = 101, 37


def _config(kind: str):
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.Qwen2Config(
        **common, use_sliding_window=True, sliding_window=9, max_window_layers=1,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip


def _batch(padded: bool):
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    if padded:
        mask[0, :5] = 0  # left padding, 5 tokens
        mask[1, :19] = 0
    return ids, mask


def _logits_and_grads(model, ids, mask, **kwargs):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    keep = mask.bool()
    logits[keep].square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits[keep].detach(), grads


CPU_BACKENDS = ["REFERENCE"] + (["TRITON"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
CASES = [("cpu", backend) for backend in CPU_BACKENDS] + [
    pytest.param("cuda", "TRITON", marks=pytest.mark.gpu),  # fp32 kernels (IEEE dots) on the GPU
]


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_flex_attention_path_matches_eager(kind, device, backend, monkeypatch):
    use_flexattn()
    masks = []
    build = transformers.masking_utils.create_block_mask

    def spy(*args, **kwargs):  # proves the masks are flexattn's (the names were rebound)
        masks.append(build(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(transformers.masking_utils, "create_block_mask", spy)
    torch.manual_seed(0)
    config = _config(kind)
    from_config = transformers.AutoModelForCausalLM.from_config
    eager = from_config(config, attn_implementation="eager").to(device)
    flex = from_config(config, attn_implementation="flex_attention").to(device)
    flex.load_state_dict(eager.state_dict())
    for padded in (False, True):  # the second call reaches the compiled graph with new mask closures
        ids, mask = (t.to(device) for t in _batch(padded))
        want, want_grads = _logits_and_grads(eager, ids, mask)
        got, got_grads = _logits_and_grads(flex, ids, mask, kernel_options={"BACKEND": backend})
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{kind} padded={padded}: logits")
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-4, msg=f"{kind}: {name}")
    assert masks and all(isinstance(m, flexattn.BlockMask) for m in masks)


def test_use_pytorch_undoes_use_flexattn():
    import torch.nn.attention.flex_attention as torch_flex

    from flexattn.integrations.transformers import use_pytorch

    module = transformers.integrations.flex_attention
    use_flexattn()
    use_flexattn()  # idempotent: the originals are remembered once
    assert module.flex_attention is flexattn.flex_attention
    assert module.create_block_mask is flexattn.create_block_mask
    use_pytorch()
    assert module.flex_attention is torch_flex.flex_attention
    assert module.create_block_mask is torch_flex.create_block_mask
    assert transformers.masking_utils.BlockMask is torch_flex.BlockMask
    use_flexattn()
    assert transformers.masking_utils.create_block_mask is flexattn.create_block_mask
