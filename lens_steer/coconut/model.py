"""Continuous thoughts on any Hugging Face causal LM: special tokens, the multi-pass forward,
generation, saving and loading.

    tok = build_word_tokenizer(vocab_words())                  # word-level: one concept = one token
    tok = train_subword_tokenizer(texts, "runs/tok")           # or byte-level BPE: covers any text
    model = build_model(tok, arch="gpt2", d_model=128, n_layers=4)   # from scratch (gpt2/qwen2/llama)
    ids = add_latent_tokens(model, tok)                        # <|start-latent|> <|latent|> <|end-latent|>
    out = continuous_forward(model, input_ids, attention_mask, ids.latent)
    out.logits, out.n_passes, out.thoughts                     # k latents -> k + 1 passes
    save_model(model, tok, "runs/m"); backend = load_model("runs/m")   # any ModelBackend
    out = continuous_forward(backend, ..., sites=["blocks.1.hook_resid_post"])  # hooks fire
    out.captured["blocks.1.hook_resid_post"]                   # (batch, seq, d) over every pass

Each `<|latent|>` position gets, as its input embedding, the last hidden state (after the final
norm) of the position before it. Pass 0 runs the prefix up to the first latent; pass i runs
latent i-1 alone (its embedding now known) and yields latent i; the last pass runs the last
latent plus everything after it. The KV cache carries the prefix; gradients flow through every
thought. Batches must be aligned on the first latent (left padding), with latents contiguous.
`model` is a Hugging Face causal LM or a `ModelBackend` (its `embed` / `forward_embeds` /
`unembed`): through a backend the latent passes run under its hooks (TransformerLens) or traces
(nnsight), and `sites` are captured over every pass.
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
INIT_FROM = "<<"
"""The official code initialises the three new tokens' embeddings (input and output) from the
token `<<`."""


@dataclass(frozen=True)
class LatentIds:
    start: int
    latent: int
    end: int


def vocab_words(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every word the generators use (plus `extra`), for a word-level tokenizer."""
    from lens_steer.coconut.data import ADJECTIVES, CONCEPTS, PEOPLE

    base = ["Every", "is", "a", "Is", "or", "not", "True", "False", "true", "false", ".", "?",
            ":", ",", SEP, INIT_FROM]
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


def train_subword_tokenizer(texts, out_dir: str | Path, vocab_size: int = 512):
    """A byte-level BPE trained on `texts` (saved to `out_dir`): it covers any input, so no
    `<unk>` can reach an answer; pad distinct from EOS, left padding."""
    from lens_steer.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, out_dir, vocab_size=vocab_size, extra_special_tokens=())


def add_latent_tokens(model, tokenizer, init_from: str = INIT_FROM) -> LatentIds:
    """Add the three markers to `tokenizer` (if absent) and grow `model`'s embeddings to match.

    New input and output embedding rows are copies of `init_from`'s rows (`<<`, as the official
    code; when `<<` is several tokens, its first token). A tokenizer without a pad token gets
    `<|pad|>` (distinct from EOS).
    """
    from lens_steer.errors import ConfigError

    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    new = [t for t in (START_LATENT, LATENT, END_LATENT) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    ids = LatentIds(*tokenizer.convert_tokens_to_ids([START_LATENT, LATENT, END_LATENT]))
    src = tokenizer.convert_tokens_to_ids(init_from)
    if src is None or src == tokenizer.unk_token_id:
        pieces = tokenizer.encode(init_from, add_special_tokens=False)
        src = pieces[0] if pieces else None
    if src is None or src == tokenizer.unk_token_id:
        raise ConfigError(f"init_from token {init_from!r} is not in the vocabulary: pass "
                          "init_from=<a token of this tokenizer>")
    old = model.get_input_embeddings().weight.shape[0]
    if old < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for w in {id(m.weight): m.weight for m in
                      (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                for i in range(old, len(tokenizer)):
                    w[i] = w[src]
    return ids


def latent_ids(tokenizer) -> LatentIds:
    """The three markers' ids in a tokenizer saved by `save_model` (error if absent)."""
    from lens_steer.errors import ArtifactError

    vocab = tokenizer.get_vocab()
    missing = [t for t in (START_LATENT, LATENT, END_LATENT) if t not in vocab]
    if missing:
        raise ArtifactError(f"tokenizer lacks {missing}: prepare the model with "
                            "`add_latent_tokens` (or `prepare_model`) and save it")
    return LatentIds(*(vocab[t] for t in (START_LATENT, LATENT, END_LATENT)))


ARCHS = ("qwen2", "llama", "gpt2")


def build_model(tokenizer, *, arch: str = "qwen2", d_model: int = 128, n_layers: int = 4,
                n_heads: int = 4, d_ff: int | None = None, max_positions: int = 1024,
                seed: int = 0, tie_embeddings: bool = True):
    """A from-scratch causal LM (`arch`: qwen2, llama or gpt2) sized for `tokenizer`
    (call `add_latent_tokens` after)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from lens_steer.errors import ConfigError

    if arch not in ARCHS:
        raise ConfigError(f"arch must be one of {ARCHS}, not {arch!r}")
    torch.manual_seed(seed)
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=tie_embeddings)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=d_model, n_layer=n_layers,
                         n_head=n_heads, n_inner=d_ff or 4 * d_model, n_positions=max_positions,
                         attn_implementation="sdpa", **special)
        return GPT2LMHeadModel(cfg)
    cls_cfg, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                    "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    cfg = cls_cfg(vocab_size=len(tokenizer), hidden_size=d_model,
                  intermediate_size=d_ff or 4 * d_model, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_heads,
                  max_position_embeddings=max_positions, attn_implementation="sdpa", **special)
    return cls(cfg)


def save_model(model, tokenizer, out: str | Path) -> Path:
    """Save as a standard Hugging Face folder (safetensors + tokenizer): `load_model(out)` and
    `load_saved_model(out)` both read it. Files are written beside `out`'s other contents (a
    run's lock, `init/`) and moved in one rename each, `config.json` last."""
    import os
    import shutil
    import tempfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save.", dir=out))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # each file lands in one rename, config.json last: a crash mid-save never leaves a
        # folder that loads as a model with half-written weights
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            f.chmod(0o644)
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_saved_model(path: str | Path):
    """(Hugging Face model, tokenizer, latent ids) from a folder written by `save_model`
    (any causal LM architecture: the config names it)."""
    from transformers import AutoModelForCausalLM

    from lens_steer.backends import load_tokenizer
    from lens_steer.errors import ArtifactError

    path = Path(path)
    if not (path / "config.json").exists():
        raise ArtifactError(f"{path} holds no saved model (config.json): pass a folder written "
                            "by `coconut train` / `run` (models/<method>) or `save_model`")
    tok = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, tok, latent_ids(tok)


def prepare_model(source: str | Path, out: str | Path, init_from: str = INIT_FROM) -> Path:
    """Copy a Hugging Face causal LM folder (GPT-2, Qwen2, Llama, ...) to `out` with the three
    latent markers added (embeddings from `init_from`), ready for Coconut training and for
    `load_model(out, backend=...)`."""
    from transformers import AutoModelForCausalLM

    from lens_steer.backends import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    try:
        tok = load_tokenizer(str(source))
    except ValueError:                         # no pad token (GPT-2): add_latent_tokens adds one
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
        tok.padding_side = "left"
    add_latent_tokens(model, tok, init_from)
    return save_model(model, tok, out)


class LatentRunner:
    """The three operations the latent loop needs, on a HF model or a `ModelBackend`."""

    def __init__(self, model):
        from lens_steer.backends.base import ModelBackend

        self.backend = model if isinstance(model, ModelBackend) else None
        self.model = model

    def embed(self, ids: Tensor) -> Tensor:
        if self.backend is not None:
            return self.backend.embed(ids)
        return self.model.get_input_embeddings()(ids)

    def head(self, h: Tensor) -> Tensor:
        if self.backend is not None:
            return self.backend.unembed(h)
        return self.model.get_output_embeddings()(h)

    def new_cache(self):
        from transformers import DynamicCache

        cfg = (self.backend.hf_model if self.backend is not None else self.model).config
        return DynamicCache(config=cfg)

    def step(self, emb, mask, pos, cache, sites, hidden_states: bool):
        """(post-norm hidden, per-layer hidden states or None, captured sites)."""
        if self.backend is not None:
            if hidden_states:
                raise ValueError("through a backend, ask for `sites` instead of hidden states")
            out = self.backend.forward_embeds(emb, mask, pos, cache, sites)
            return out.hidden, None, out.captured
        if sites:
            raise ValueError("`sites` need a ModelBackend (load the model with load_model)")
        out = self.model.base_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                    past_key_values=cache, use_cache=True,
                                    output_hidden_states=hidden_states)
        return out.last_hidden_state, out.hidden_states, {}


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
    captured: dict[str, Tensor]
    """Site -> activations `(batch, seq, d)` over every pass (through a `ModelBackend`)."""


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
                       sites: tuple[str, ...] | list[str] = (),
                       ) -> ContinuousOutput:
    """Forward with continuous thoughts at every `latent_id` position (k latents: k + 1 passes).

    `model`: a HF causal LM or a `ModelBackend`; `sites` (backend only): hook names captured
    over every pass, concatenated along the sequence in `ContinuousOutput.captured`.
    """
    run = LatentRunner(model)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    emb = run.embed(input_ids)
    dev = emb.device
    attention_mask = attention_mask.to(dev)
    pos_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    first, counts = latent_layout(input_ids, latent_id)
    k = max(counts, default=0)
    cache = run.new_cache()
    hiddens: list[Tensor] = []
    layer_hiddens: list[tuple[Tensor, ...]] = []
    captured: dict[str, list[Tensor]] = {s: [] for s in sites}
    thoughts = emb.new_zeros(B, k, emb.shape[-1])
    bounds = [first + i for i in range(k)] + [T]
    start = 0
    for i, end in enumerate(bounds):
        h, hs, cap = run.step(emb[:, start:end], attention_mask[:, :end],
                              pos_ids[:, start:end], cache, tuple(sites), output_hidden_states)
        hiddens.append(h)
        if output_hidden_states:
            layer_hiddens.append(hs)
        for name, x in cap.items():
            captured[name].append(x)
        if i < k:                                           # hidden at end-1 -> latent i at end
            rows = torch.tensor([c > i for c in counts], device=dev)
            sel = torch.zeros(B, T, 1, dtype=torch.bool, device=dev)
            sel[rows, end] = True
            thought = h[:, -1]
            emb = torch.where(sel, thought[:, None, :].to(emb.dtype), emb)
            thoughts = torch.where(
                rows[:, None, None] & (torch.arange(k, device=dev) == i)[None, :, None],
                thought[:, None, :].to(thoughts.dtype), thoughts)
        start = end
    hidden = torch.cat(hiddens, dim=1)
    logits = run.head(hidden)
    loss = None
    if labels is not None:
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(dev),
            ignore_index=-100)
    hs_all = None
    if output_hidden_states:
        hs_all = tuple(torch.cat([lh[j] for lh in layer_hiddens], dim=1)
                       for j in range(len(layer_hiddens[0])))
    return ContinuousOutput(logits=logits, loss=loss, n_passes=len(bounds), inputs_embeds=emb,
                            thoughts=thoughts, hidden_states=hs_all,
                            past_key_values=cache if use_cache else None,
                            captured={n: torch.cat(v, dim=1) for n, v in captured.items()})


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, latent_id: int, eos_id: int, pad_id: int,
             max_new_tokens: int = 128) -> tuple[list[list[int]], ContinuousOutput]:
    """Greedy continuation of `prompts` (token ids; latents become continuous thoughts).

    `model`: a HF causal LM or a `ModelBackend`. Prompts are left-padded; with latents they
    must share the latent layout after padding (e.g. all end in `<|start-latent|>
    <|latent|>*k <|end-latent|>`). Returns generated ids per prompt (up to and excluding EOS)
    and the prompt's `ContinuousOutput`.
    """
    run = LatentRunner(model)
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = continuous_forward(model, ids, mask, latent_id, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1)
    dev = nxt.device
    mask = mask.to(dev)
    pos = mask.sum(1) - 1
    done = [False] * len(prompts)
    gen: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        for b, tok in enumerate(nxt.tolist()):      # one device sync per step, not per row
            if not done[b]:
                if tok == eos_id:
                    done[b] = True
                else:
                    gen[b].append(tok)
        if all(done):
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=dev)], 1)
        pos = pos + 1
        h, _, _ = run.step(run.embed(nxt[:, None]), mask, pos[:, None], cache, (), False)
        nxt = run.head(h[:, -1]).argmax(-1)
    return gen, out
