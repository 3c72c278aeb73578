"""Version workarounds: the TransformerLens bridge keeps a KV cache on every transformers release.

transformers >= 5.24 passes the cache to attention as `cache=`; TransformerLens 4.3's attention
ignored it, so the cache stayed empty (see lens_steer/backends/compat.py).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from lens_steer.backends.compat import patch_bridge_kv_cache
from tests.conftest import loaded

PROMPT = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]


def test_bridge_forward_fills_the_kv_cache_and_decodes_like_hf(tiny_model_dir):
    model = loaded(tiny_model_dir, "transformer_lens")
    ids = torch.tensor(PROMPT)
    mask = torch.ones(2, ids.shape[1] + 1, dtype=torch.long)
    with torch.no_grad():
        _, past = model.bridge(ids, return_type="logits_and_cache", use_cache=True,
                               attention_mask=mask[:, :-1])
        assert past is not None and past.get_seq_length() == ids.shape[1], "KV cache is empty"
        nxt = torch.tensor([[17], [18]])
        logits, past = model.bridge(nxt, return_type="logits_and_cache", past_key_values=past,
                                    use_cache=True, attention_mask=mask)
        assert past.get_seq_length() == ids.shape[1] + 1
        hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        ref = hf(torch.cat([ids, nxt], 1)).logits[:, -1]
    assert (logits[:, -1] - ref).abs().max() < 1e-4


def test_backend_generation_matches_hf_generate(tiny_model_dir):
    """Cached greedy decoding through the bridge writes HF's tokens (an empty cache diverges)."""
    from lens_steer import GenerationConfig

    model = loaded(tiny_model_dir, "transformer_lens")
    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    got = model.generate(PROMPT, cfg).generated_ids
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          min_new_tokens=8, do_sample=False, pad_token_id=1)
    assert [list(g) for g in got] == ref[:, ids.shape[1]:].tolist()


def test_patch_is_idempotent(tiny_model_dir):
    model = loaded(tiny_model_dir, "transformer_lens")
    assert patch_bridge_kv_cache(model.bridge) == 0  # already patched at load
