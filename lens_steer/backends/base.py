"""The one small interface every backend implements, and the methods/experiments use.

A backend wraps a causal LM plus its tokenizer. Positions are always counted over a
sequence's *real* tokens (0 = its first token), independent of padding; batches are left-padded.

    model = lens_steer.load_model("toy")                       # or a local HF dir / hub name
    ids = model.encode("Question: ...")
    acts = model.capture_resid([ids], layers=[0, 2], positions=[[5, 9]])   # {0: (2, d), 2: (2, d)}
    acts = model.capture([ids], ["blocks.2.hook_resid_pre", "blocks.1.attn.hook_z"], [[5, 9]])
    out = model.generate(["Question: ..."], GenerationConfig(max_new_tokens=64),
                         interventions=[Intervention(layer=2, vector=v, rule=NewestPosition())])
    out.texts, out.steered                                    # what was edited, exactly
    with model.intervening([Intervention.zero_ablate("blocks.1.hook_mlp_out")]):
        model.logits([ids])                                   # every forward is edited here

Sites are TransformerLens hook names (`lens_steer.sites`); operations are in
`lens_steer.interventions`. Backends implement four methods (`capture`, `logits`,
`forward_step`, `last_logits_given_delta`); edits reach them as `Edit`s, whether they come from
`generate(..., interventions=...)` or from `intervening(...)` blocks (a per-context stack, so
blocks nest, are removed on exceptions, and never patch the instance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_steer.errors import ConfigError
from lens_steer.generation import GenerationConfig, GenerationResult, TokenIds, generate
from lens_steer.interventions import Edit, Intervention, validate_interventions
from lens_steer.sites import Site, validate_site


@runtime_checkable
class DecodeState(Protocol):
    """What one backend carries from one decode step to the next (a KV cache, or the token
    history when the cache cannot stay on the executor). The backend that returned it from
    `forward_step` is the only one that reads or extends it; the shared loop only drops the rows
    of finished sequences."""

    def select_rows(self, rows: Int[Tensor, "keep"]) -> DecodeState:
        """Keep only batch rows `rows` (in that order); may update in place and return self."""
        ...


@dataclass
class EmbedsOutput:
    """What `ModelBackend.forward_embeds` returns."""

    hidden: Float[Tensor, "batch width d_model"]
    """Final hidden states after the last norm (what the unembedding reads)."""
    past: Any
    """The KV cache, extended by the new positions."""
    captured: dict[str, Tensor] = field(default_factory=dict)
    """Site name -> activations `(batch, width, d)` at the new positions."""


class ModelBackend(ABC):
    """A causal LM behind one small interface; see the module docstring."""

    name: str
    source: str
    tokenizer: Any
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    device: torch.device
    dtype: torch.dtype

    # -- tokens ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added (the trace's own ids)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: TokenIds, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: TokenIds) -> list[str]:
        """Decoded text of each token on its own."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def pad_batch(self, sequences: Sequence[TokenIds]
                  ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Left-pad token id lists into (input_ids, attention_mask) on this model's device."""
        if len(sequences) == 0:
            raise ValueError("empty batch: pass at least one sequence")
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token: set tokenizer.pad_token (distinct from EOS) "
                "before batching")
        width = max(len(s) for s in sequences)
        if width == 0:
            raise ValueError("every sequence in the batch is empty")
        self.check_length(width)
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for b, s in enumerate(sequences):
            if len(s):
                ids[b, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
                mask[b, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    extrapolate: bool = False
    """Set True to run sequences past the model's position limit (`max_positions`); off by
    default because past it a model's outputs are untrained extrapolation."""

    @property
    def max_positions(self) -> int | None:
        """The model's position limit (`max_position_embeddings`), None when it states none."""
        try:
            limit = getattr(self.hf_model.config, "max_position_embeddings", None)
        except NotImplementedError:
            return None
        return int(limit) if limit else None

    def check_length(self, n_tokens: int, what: str = "a sequence") -> None:
        """Refuse `n_tokens` beyond the position limit unless `extrapolate` is set."""
        limit = self.max_positions
        if limit is not None and n_tokens > limit and not self.extrapolate:
            raise ConfigError(
                f"{what} has {n_tokens} tokens but {self.source} has a position limit of {limit} "
                "(max_position_embeddings): shorten it, or set `model.extrapolate = True` to "
                "run past the limit knowingly")

    # -- reading activations ---------------------------------------------------------------
    @abstractmethod
    def capture(self, sequences: Sequence[TokenIds], sites: Sequence[str | Site | int],
                positions: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Activations at `sites` (TransformerLens hook names) at the chosen positions only.

        `positions[b]` are real-token indices of sequence b. Each value has one row per chosen
        position, ordered by sequence, then by the order of `positions[b]`: (n, d_model), or
        (n, n_heads, d_head) for `attn.hook_z`, or (n, n_heads, max_len) for
        `attn.hook_pattern` (keys by real position, zero beyond a sequence's length). Keys are
        the canonical site names. Float32 on CPU. Active `intervening` edits apply (a capture
        at an edited site sees the edited value).
        """

    def capture_resid(self, sequences: Sequence[TokenIds], layers: Sequence[int],
                      positions: Sequence[Sequence[int]]) -> dict[int, Float[Tensor, "n d_model"]]:
        """Residual stream after each block in `layers` (`blocks.L.hook_resid_post`) at the
        chosen positions; see `capture`. Memory is O(positions x layers x d_model)."""
        layers = self.validate_layers(layers)
        got = self.capture(sequences, [Site("resid_post", layer) for layer in layers], positions)
        return {layer: got[Site("resid_post", layer).name] for layer in layers}

    def _capture_batch(self, sequences: Sequence[TokenIds], sites: Sequence[str | Site | int],
                       positions: Sequence[Sequence[int]]):
        """What every `capture` starts from: unique checked sites, the left-padded batch and the
        (row, column) of each requested real-token position."""
        from lens_steer.backends.hf_common import gather_index

        sites = list(dict.fromkeys(self.validate_sites(sites)))
        input_ids, mask = self.pad_batch(sequences)
        rows, cols = gather_index([len(s) for s in sequences], input_ids.shape[1], positions)
        return sites, input_ids, mask, rows, cols

    def validate_sites(self, sites: Sequence[str | Site | int]) -> list[Site]:
        """Parse and check `sites` against this model, before any forward."""
        if len(sites) == 0:
            raise ConfigError("no sites given: pass at least one site, e.g. "
                              "'blocks.0.hook_resid_post'")
        return [validate_site(s, self.n_layers) for s in sites]

    # -- interventions active for every forward -------------------------------------------------
    @contextmanager
    def intervening(self, interventions: Sequence[Intervention]) -> Iterator[list[Intervention]]:
        """Within the block, every forward of this model (generate, capture, logits,
        last_logits_given_delta) applies `interventions` too, after any outer block's. Plain
        forwards evaluate position rules as a prefill. Per thread / async context."""
        ivs = list(interventions)
        validate_interventions(ivs, self.n_layers, self.d_model, self.n_heads, self.d_head)
        var = self._intervention_stack()
        token = var.set((*var.get(), *ivs))
        try:
            yield ivs
        finally:
            var.reset(token)

    @property
    def active_interventions(self) -> tuple[Intervention, ...]:
        """Interventions installed by enclosing `intervening` blocks, outermost first."""
        return self._intervention_stack().get()

    def _intervention_stack(self) -> ContextVar[tuple[Intervention, ...]]:
        var = self.__dict__.get("_iv_stack")
        if var is None:
            var = self.__dict__.setdefault(
                "_iv_stack", ContextVar(f"lens_steer_interventions_{id(self)}", default=()))
        return var

    def forward_edits(self, sequences: Sequence[TokenIds], width: int,
                      extra: Sequence[Intervention] = ()) -> list[Edit]:
        """Edits of the active (plus `extra`) interventions for one plain forward over
        left-padded `sequences` of `width` columns: position rules evaluated as a prefill."""
        ivs = [*self.active_interventions, *extra]
        if not ivs:
            return []
        lengths = [len(s) for s in sequences]
        edits = []
        for i, iv in enumerate(ivs):
            mask = iv.rule.mask([list(s) for s in sequences], lengths, width)
            if mask.any():
                prepared = iv.prepare(self.device, self.dtype, key=i)
                edits.append(prepared.edit(mask, range(len(sequences)), lengths, self.device,
                                           self.dtype))
        return edits

    @abstractmethod
    def logits(self, sequences: Sequence[TokenIds]) -> list[Float[Tensor, "pos vocab"]]:
        """Next-token logits at every real position of each sequence."""

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[TokenIds],
                 config: GenerationConfig | None = None,
                 interventions: Sequence[Intervention] = (), progress: bool = False
                 ) -> GenerationResult:
        """Decode with the KV cache, applying `interventions` under their position rules."""
        return generate(self, prompts, config or GenerationConfig(), interventions, progress)

    def decoding(self, sites: Sequence[Site]) -> AbstractContextManager[None]:
        """Context for one generation that edits `sites`: a backend may install its hooks
        once here instead of at every `forward_step`. Default: nothing to set up."""
        return nullcontext()

    @abstractmethod
    def forward_step(self, input_ids: Int[Tensor, "batch width"],
                     attention_mask: Int[Tensor, "batch total"], past: DecodeState | None,
                     edits: Sequence[Edit]
                     ) -> tuple[Float[Tensor, "batch vocab"], DecodeState]:
        """One forward step: returns last-position logits and the new decode state.

        `past` is None at prefill, else the state this backend returned at the previous step
        (possibly row-selected). `attention_mask` covers cached + new positions; each `Edit`
        has a bool mask over the `width` new positions and says what to do at its site.
        """

    # -- differentiable access for strength calibration -------------------------------------
    @abstractmethod
    def last_logits_given_delta(self, sequence: TokenIds, layer: int | str | Site,
                                delta: Float[Tensor, "d_model"]) -> Float[Tensor, "vocab"]:
        """Next-token logits at the last position with `delta` added there at `layer` (an int:
        that block's `resid_post`; or any editable site name, e.g. a `SteeringVector.site`),
        after any active `intervening` edits; differentiable in `delta` (autograd)."""

    # -- continuous inputs (Coconut's latent passes) ---------------------------------------------
    def embed(self, input_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Input embeddings of `input_ids` (differentiable), for callers that edit them."""
        return self.hf_model.get_input_embeddings()(input_ids.to(self.device))

    def unembed(self, hidden: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        """Logits of final (post-norm) hidden states through the model's own unembedding."""
        return self.hf_model.get_output_embeddings()(hidden)

    def forward_embeds(self, inputs_embeds: Float[Tensor, "batch width d_model"],
                       attention_mask: Int[Tensor, "batch total"],
                       position_ids: Int[Tensor, "batch width"], past: Any = None,
                       sites: Sequence[str] = ()) -> EmbedsOutput:
        """One forward from input embeddings through the KV cache `past` (a Hugging Face
        `Cache`; None starts one): post-norm hidden states of the `width` new positions, the
        cache, and the activations at `sites` (TransformerLens hook names) over those positions.
        The backend's own hooks fire, so latent passes can be read like any other forward."""
        raise NotImplementedError(f"{type(self).__name__} cannot run from input embeddings")

    # -- what the memory planner and large-model tools need -------------------------------------
    @property
    def hf_model(self) -> Any:
        """The underlying Hugging Face model (its `config`, device map, parameters)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose a Hugging Face model")

    remote: bool | str = False
    """False locally; True / "local" / a host URL when traces run on NDIF (nnsight)."""
    prefill_chunk: int | None = None
    """Tokens per forward when long prompts are fed in chunks (None: all at once)."""

    @property
    def device_map(self) -> dict[str, Any] | None:
        """Module -> device map of an accelerate-dispatched model (None when not dispatched)."""
        return None

    def validate_layers(self, layers: Sequence[int]) -> list[int]:
        layers = list(layers)
        bad = [layer for layer in layers if not isinstance(layer, int)
               or not 0 <= layer < self.n_layers]
        if bad:
            raise ValueError(f"unknown layer(s) {bad}: this model has layers 0..{self.n_layers - 1}")
        return layers

    def describe(self) -> dict[str, Any]:
        """Provenance for artifacts: which model, which backend, its shape."""
        return {"model": self.source, "backend": self.name, "n_layers": self.n_layers,
                "d_model": self.d_model, "dtype": str(self.dtype).removeprefix("torch.")}
