"""Tiny models and tokenizers built on the spot, for tests and benchmarks (no downloads).

`build_tokenizer` trains a byte-level BPE in which `\\n\\n` and merged forms such as `.\\n\\n`
are single tokens, like Qwen2's; `build_tiny_model` saves a random-weight Qwen2 or Llama
(grouped-query attention) next to it as a standard Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lens_steer.tokenization import train_bpe_tokenizer

CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples?\n<think>\nTom starts with 3.\n\n"
    "He buys 4 more, so 3 + 4 = 7.\n\nWait, let me check: 3 + 4 = 7. That's correct.\n\n"
    "Alternatively, count up from 4: 5, 6, 7.\n\n</think>\n\\boxed{7}",
    "The cat sat on the mat.\n\nThen it slept.\n\nHold on, let me verify the steps again.\n\n",
    "Another way to see it: 12 - 5 = 7.\n\n So the answer is 7. \n\nThink again about it.\n\n",
    "We compute 6 * 7 = 42.\n\nAlternatively, 7 * 6 = 42.\n\nWait, that seems right.\n\n",
]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """Train the test tokenizer (Qwen2-style byte-level BPE) and save it to `out_dir`."""
    return train_bpe_tokenizer(CORPUS * 20, out_dir, vocab_size=vocab_size)


def build_tiny_model(out_dir: str | Path, arch: str = "qwen2", *, d_model: int = 64,
                     n_layers: int = 3, n_heads: int = 4, n_kv_heads: int = 2,
                     vocab_size: int | None = None, seed: int = 0, tokenizer=None) -> Path:
    """Save a random-weight tiny `arch` ("qwen2" | "llama") model plus tokenizer to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer(out_dir)
    tokenizer.save_pretrained(out_dir)
    common = dict(
        vocab_size=vocab_size or len(tokenizer), hidden_size=d_model, intermediate_size=4 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown arch {arch!r}; use 'qwen2' or 'llama'")
    with torch.no_grad():  # larger weights than the default init, so steering has visible effects
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(out_dir)
    return out_dir
