"""Small pieces both backends need: loading the tokenizer, position ids, row gathering."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


def load_tokenizer(source: str):
    """Load the tokenizer saved beside the model; checks it can pad."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(source) / "tokenizer.json").exists() and _is_custom_bpe(source):
        tok = PreTrainedTokenizerFast.from_pretrained(source)
    else:
        tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token_id is None:
        raise ValueError(
            f"the tokenizer of {source} has no pad token: batched generation needs one. Set "
            "`tokenizer.pad_token` to a token distinct from EOS and save it with the model")
    tok.padding_side = "left"
    return tok


def _is_custom_bpe(source: str) -> bool:
    """Our own tokenizers are saved as PreTrainedTokenizerFast; AutoTokenizer would re-split."""
    import json

    cfg = Path(source) / "tokenizer_config.json"
    if not cfg.exists():
        return True
    return json.loads(cfg.read_text()).get("tokenizer_class") in (
        None, "PreTrainedTokenizerFast", "TokenizersBackend")   # the latter: transformers 5


def position_ids(attention_mask: Int[Tensor, "batch total"], width: int
                 ) -> Int[Tensor, "batch width"]:
    """Positions of the last `width` columns, counting real tokens only (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -width:]


def gather_index(lengths: Sequence[int], width: int, positions: Sequence[Sequence[int]]
                 ) -> tuple[Int[Tensor, "n"], Int[Tensor, "n"]]:
    """(batch, column) indices in a left-padded batch for real-token `positions`."""
    rows, cols = [], []
    for b, (length, pos) in enumerate(zip(lengths, positions, strict=True)):
        for p in pos:
            if not -length <= p < length:
                raise IndexError(f"position {p} is outside sequence {b} of length {length}")
            rows.append(b)
            cols.append(width - length + (p % length))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def gather_pattern(pattern: Float[Tensor, "batch heads query key"], rows: Int[Tensor, "n"],
                   cols: Int[Tensor, "n"], lengths: Sequence[int]
                   ) -> Float[Tensor, "n heads max_len"]:
    """Attention rows at the gathered query columns, keys re-indexed by real position (zeros
    beyond each sequence's length)."""
    width = pattern.shape[-1]
    picked = pattern[rows.to(pattern.device), :, cols.to(pattern.device)].detach().float().cpu()
    out = torch.zeros(len(rows), pattern.shape[1], max(lengths))
    for i, b in enumerate(rows.tolist()):
        out[i, :, :lengths[b]] = picked[i, :, width - lengths[b]:]
    return out


@dataclass
class KVState:
    """`DecodeState` around a Hugging Face `Cache` (the KV cache of the decoded rows)."""

    cache: Any

    def select_rows(self, rows: Int[Tensor, "keep"]) -> KVState:
        self.cache.batch_select_indices(rows)
        return self


def chunked_prefill(step, input_ids: Int[Tensor, "batch width"],
                    attention_mask: Int[Tensor, "batch total"], past: Any, edits: Sequence,
                    chunk: int) -> tuple[Tensor, Any]:
    """`step(ids, mask, past, edits) -> (logits, past)` over `chunk`-column slices of a long
    prefill, each through the cache the previous one filled; the last slice's logits."""
    width, total, logits = input_ids.shape[1], attention_mask.shape[1], None
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        logits, past = step(input_ids[:, start:end], attention_mask[:, :total - width + end],
                            past, [e.columns(start, end) for e in edits])
    return logits, past


def capture_in_chunks(span, rows: Int[Tensor, "n"], cols: Int[Tensor, "n"], width: int,
                      chunk: int, names: Sequence[str]) -> dict[str, Tensor]:
    """`span(start, end, rows, cols) -> {name: values of the gathered (row, col - start)}` over
    `chunk`-column slices [start, end) of a long trace; values back in the `rows`/`cols` order."""
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    order = []
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        sel = ((cols >= start) & (cols < end)).nonzero()[:, 0]
        got = span(start, end, rows[sel], cols[sel] - start)
        for n in names:
            parts[n].append(got[n])
        order.append(sel)
    inverse = torch.cat(order).argsort()
    return {n: torch.cat(parts[n])[inverse] for n in names}
