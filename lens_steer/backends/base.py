"""The one small interface every backend implements, and the methods/experiments use.

A backend wraps a causal LM plus its tokenizer. Positions are always counted over a
sequence's *real* tokens (0 = its first token), independent of padding; batches are left-padded.

    model = lens_steer.load_model("toy")                       # or a local HF dir / hub name
    ids = model.encode("Question: ...")
    acts = model.capture_resid([ids], layers=[0, 2], positions=[[5, 9]])   # {0: (2, d), 2: (2, d)}
    out = model.generate(["Question: ..."], GenerationConfig(max_new_tokens=64),
                         interventions=[Intervention(layer=2, vector=v, rule=NewestPosition())])
    out.texts, out.steered                                    # what was steered, exactly
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_steer.interventions import Intervention, SteeredSite

TokenIds = Sequence[int]


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
class GenerationConfig:
    """How to decode. `temperature == 0` is greedy."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens per sequence."""
    temperature: float = 0.0
    """0 for greedy decoding; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass (only when sampling)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the sequence (1.0 = off)."""
    stop_strings: tuple[str, ...] = ()
    """Stop a sequence once its generated text contains one of these (kept in the output)."""
    stop_at_eos: bool = True
    """Stop a sequence at the tokenizer's EOS token."""
    logit_bias: dict[int, float] | None = None
    """Added to the next-token logits at every step (the logits-penalty baseline)."""
    batch_size: int = 32
    """Sequences decoded together (left-padded)."""
    seed: int | None = 0
    """Seed for sampling; None leaves the global RNG alone."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    """Each prompt's token ids (no padding)."""
    generated_ids: list[list[int]]
    """Each sequence's generated token ids (no padding; EOS included if produced)."""
    texts: list[str]
    """Decoded generated text per sequence (special tokens kept except EOS/pad)."""
    finish_reasons: list[str]
    """'eos' | 'stop_string' | 'length' per sequence."""
    steered: list[SteeredSite] = field(default_factory=list)
    """Every (sequence, position, layer) an intervention touched."""
    wall_time_s: float = 0.0

    @property
    def n_generated(self) -> list[int]:
        return [len(g) for g in self.generated_ids]


class ModelBackend(ABC):
    """A causal LM behind one small interface; see the module docstring."""

    name: str
    source: str
    tokenizer: Any
    n_layers: int
    d_model: int
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
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for b, s in enumerate(sequences):
            if len(s):
                ids[b, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
                mask[b, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- reading activations ---------------------------------------------------------------
    @abstractmethod
    def capture_resid(self, sequences: Sequence[TokenIds], layers: Sequence[int],
                      positions: Sequence[Sequence[int]]) -> dict[int, Float[Tensor, "n d_model"]]:
        """Residual stream after each block in `layers` at the chosen positions only.

        `positions[b]` are real-token indices of sequence b. Rows are ordered by sequence,
        then by the order of `positions[b]`. Memory is O(positions x layers x d_model).
        """

    @abstractmethod
    def logits(self, sequences: Sequence[TokenIds]) -> list[Float[Tensor, "pos vocab"]]:
        """Next-token logits at every real position of each sequence."""

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[TokenIds],
                 config: GenerationConfig | None = None,
                 interventions: Sequence[Intervention] = (), progress: bool = False
                 ) -> GenerationResult:
        """Decode with the KV cache, applying `interventions` under their position rules."""
        from lens_steer.generation import generate

        return generate(self, prompts, config or GenerationConfig(), interventions, progress)

    def decoding(self, layers: Sequence[int]) -> AbstractContextManager[None]:
        """Context for one generation that edits `layers`: a backend may install its hooks
        once here instead of at every `forward_step`. Default: nothing to set up."""
        return nullcontext()

    @abstractmethod
    def forward_step(self, input_ids: Int[Tensor, "batch width"],
                     attention_mask: Int[Tensor, "batch total"], past: DecodeState | None,
                     edits: Sequence[tuple[int, Tensor, Float[Tensor, "d_model"]]]
                     ) -> tuple[Float[Tensor, "batch vocab"], DecodeState]:
        """One forward step: returns last-position logits and the new decode state.

        `past` is None at prefill, else the state this backend returned at the previous step
        (possibly row-selected). `attention_mask` covers cached + new positions; `edits` are
        (layer, bool mask over the `width` new positions, delta) added to `resid_post` of that
        layer.
        """

    # -- differentiable access for strength calibration -------------------------------------
    @abstractmethod
    def last_logits_given_delta(self, sequence: TokenIds, layer: int,
                                delta: Float[Tensor, "d_model"]) -> Float[Tensor, "vocab"]:
        """Next-token logits at the last position with `delta` added to layer `layer`'s
        `resid_post` at that position; differentiable in `delta` (autograd)."""

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
