"""Continuous thoughts on a Hugging Face causal LM: special tokens, the multi-pass forward, generation.

    tok = build_word_tokenizer(vocab_words())                  # word-level: one concept = one token
    model = build_model(tok, d_model=128, n_layers=4)          # tiny Qwen2 from scratch
    ids = add_latent_tokens(model, tok)                        # <|start-latent|> <|latent|> <|end-latent|>
    out = continuous_forward(model, input_ids, attention_mask, ids.latent)
    out.logits, out.n_passes, out.thoughts                     # k latents -> k + 1 passes

Each `<|latent|>` position gets, as its input embedding, the last hidden state (after the final
norm) of the position before it. Pass 0 runs the prefix up to the first latent; pass i runs
latent i-1 alone (its embedding now known) and yields latent i; the last pass runs the last
latent plus everything after it. The KV cache carries the prefix; gradients flow through every
thought. Batches must be aligned on the first latent (left padding), with latents contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

START_LATENT, LATENT, END_LATENT = "<|start-latent|>", "<|latent|>", "<|end-latent|>"
PAD, EOS, UNK, SEP = "<pad>", "<eos>", "<unk>", "###"
"""Pad (distinct from EOS), EOS, unknown word, and the separator before the answer."""


@dataclass(frozen=True)
class LatentIds:
    start: int
    latent: int
    end: int


def vocab_words(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every word the generators use (plus `extra`), for a word-level tokenizer."""
    from lens_steer.coconut.data import ADJECTIVES, CONCEPTS, PEOPLE

    base = ["Every", "is", "a", "Is", "or", "not", "True", "False", "true", "false", ".", "?",
            ":", ",", SEP]
    seen, out = set(), []
    for w in [*base, *PEOPLE, *CONCEPTS, *ADJECTIVES, *extra]:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def words_of(texts: list[str]) -> list[str]:
    """The word-level pieces of `texts` (same split as the tokenizer: words and punctuation runs)."""
    import re

    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})


def build_word_tokenizer(words: list[str], out_dir: str | Path | None = None):
    """A `PreTrainedTokenizerFast` over a fixed word list (plus pad/eos/unk), left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([PAD, EOS, UNK, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="\u0001", cleanup=True)   # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left")
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def add_latent_tokens(model, tokenizer, init_from: str = SEP) -> LatentIds:
    """Add the three markers to `tokenizer` (if absent) and grow `model`'s embeddings to match.

    New input and output embedding rows are copies of `init_from`'s rows.
    """
    new = [t for t in (START_LATENT, LATENT, END_LATENT) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    ids = LatentIds(*tokenizer.convert_tokens_to_ids([START_LATENT, LATENT, END_LATENT]))
    src = tokenizer.convert_tokens_to_ids(init_from)
    if src is None or src == tokenizer.unk_token_id:
        raise ValueError(f"init_from token {init_from!r} is not in the vocabulary")
    old = model.get_input_embeddings().weight.shape[0]
    if old < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for w in {id(m.weight): m.weight for m in
                      (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                for i in range(old, len(tokenizer)):
                    w[i] = w[src]
    return ids


def build_model(tokenizer, *, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                d_ff: int | None = None, max_positions: int = 512, seed: int = 0,
                tie_embeddings: bool = True):
    """A from-scratch Qwen2 causal LM sized for `tokenizer` (call `add_latent_tokens` after)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_ff or 4 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
        max_position_embeddings=max_positions, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_embeddings, attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(cfg)


@dataclass
class ContinuousOutput:
    logits: Float[Tensor, "batch seq vocab"]
    """Next-token logits at every position (latent positions included)."""
    loss: Tensor | None
    """Mean cross-entropy over labels != -100 (shifted), when labels were given."""
    n_passes: int
    """Sequential forward passes run: number of latents + 1."""
    inputs_embeds: Float[Tensor, "batch seq d_model"]
    """The input embeddings actually used: latent rows hold the continuous thoughts."""
    thoughts: Float[Tensor, "batch n_latent d_model"]
    """Continuous thought i of each row (zeros where a row has fewer latents)."""
    hidden_states: tuple[Tensor, ...] | None
    """Per-layer residual stream `[n_layers + 1] x (batch, seq, d)` when requested."""
    past_key_values: object | None
    """The KV cache after the last pass (for continuing generation)."""


def latent_layout(input_ids: Int[Tensor, "batch seq"], latent_id: int) -> tuple[int, list[int]]:
    """(first latent position, latents per row); checks latents are contiguous and aligned."""
    mask = input_ids == latent_id
    counts = mask.sum(1).tolist()
    if max(counts, default=0) == 0:
        return -1, counts
    firsts = {int(r.nonzero()[0]) for r in mask if r.any()}
    if len(firsts) != 1:
        raise ValueError(f"batch not aligned on the first latent (first positions {sorted(firsts)})")
    first = firsts.pop()
    for b, c in enumerate(counts):
        if c and not mask[b, first:first + c].all():
            raise ValueError(f"row {b}: latent tokens are not contiguous")
    return first, counts


def continuous_forward(model, input_ids: Int[Tensor, "batch seq"],
                       attention_mask: Int[Tensor, "batch seq"] | None, latent_id: int, *,
                       labels: Int[Tensor, "batch seq"] | None = None,
                       output_hidden_states: bool = False, use_cache: bool = False,
                       ) -> ContinuousOutput:
    """Forward with continuous thoughts at every `latent_id` position (k latents: k + 1 passes)."""
    from transformers import DynamicCache

    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    base, head = model.base_model, model.get_output_embeddings()
    emb = model.get_input_embeddings()(input_ids)
    pos_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    first, counts = latent_layout(input_ids, latent_id)
    k = max(counts, default=0)
    cache = DynamicCache(config=model.config)
    hiddens: list[Tensor] = []
    layer_hiddens: list[tuple[Tensor, ...]] = []
    thoughts = emb.new_zeros(B, k, emb.shape[-1])
    bounds = [first + i for i in range(k)] + [T]
    start = 0
    for i, end in enumerate(bounds):
        out = base(inputs_embeds=emb[:, start:end], attention_mask=attention_mask[:, :end],
                   position_ids=pos_ids[:, start:end], past_key_values=cache, use_cache=True,
                   output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        hiddens.append(h)
        if output_hidden_states:
            layer_hiddens.append(out.hidden_states)
        if i < k:                                           # hidden at end-1 -> latent i at end
            rows = torch.tensor([c > i for c in counts], device=emb.device)
            sel = torch.zeros(B, T, 1, dtype=torch.bool, device=emb.device)
            sel[rows, end] = True
            thought = h[:, -1]
            emb = torch.where(sel, thought[:, None, :].to(emb.dtype), emb)
            thoughts = torch.where(rows[:, None, None] & (torch.arange(k) == i)[None, :, None],
                                   thought[:, None, :].to(thoughts.dtype), thoughts)
        start = end
    hidden = torch.cat(hiddens, dim=1)
    logits = head(hidden)
    loss = None
    if labels is not None:
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    hs = None
    if output_hidden_states:
        hs = tuple(torch.cat([lh[j] for lh in layer_hiddens], dim=1)
                   for j in range(len(layer_hiddens[0])))
    return ContinuousOutput(logits=logits, loss=loss, n_passes=len(bounds), inputs_embeds=emb,
                            thoughts=thoughts, hidden_states=hs,
                            past_key_values=cache if use_cache else None)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, latent_id: int, eos_id: int, pad_id: int,
             max_new_tokens: int = 64) -> tuple[list[list[int]], ContinuousOutput]:
    """Greedy continuation of `prompts` (token ids; latents become continuous thoughts).

    Prompts are left-padded; with latents they must share the latent layout after padding
    (e.g. all end in `<|start-latent|> <|latent|>*k <|end-latent|>`). Returns generated ids per
    prompt (up to and excluding EOS) and the prompt's `ContinuousOutput`.
    """
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = continuous_forward(model, ids, mask, latent_id, use_cache=True)
    cache, base, head = out.past_key_values, model.base_model, model.get_output_embeddings()
    nxt = out.logits[:, -1].argmax(-1)
    pos = mask.sum(1) - 1
    done = torch.zeros(len(prompts), dtype=torch.bool)
    gen: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        for b in range(len(prompts)):
            if not done[b]:
                if int(nxt[b]) == eos_id:
                    done[b] = True
                else:
                    gen[b].append(int(nxt[b]))
        if done.all():
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        pos = pos + 1
        o = base(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                 past_key_values=cache, use_cache=True)
        nxt = head(o.last_hidden_state[:, -1]).argmax(-1)
    return gen, out
