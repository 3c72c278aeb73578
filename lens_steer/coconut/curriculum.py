"""Training sequences for Coconut's curriculum and the CoT / no-CoT baselines, masks, and collation.

    Coconut, stage s:  question <|start-latent|> <|latent|>*(s*c) <|end-latent|> steps[s:] ### answer <eos>
    CoT:               question steps ### answer <eos>
    no-CoT:            question ### answer <eos>

Labels are -100 on the question, the markers, the latents and padding, so the loss covers only
the remaining steps, the separator, the answer and EOS. `collate` left-pads each sequence so the
first latent (Coconut) / the first token after the question (baselines) lines up across the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lens_steer.coconut.model import SEP, LatentIds

MODES = ("coconut", "cot", "nocot")
IGNORE = -100


@dataclass
class TokenizedExample:
    question: list[int]
    steps: list[list[int]]
    answer: list[int]
    """`### <answer tokens> <eos>`."""


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int]
    anchor: int
    """Position aligned across a batch: the first latent (Coconut) or first post-question token."""
    n_latents: int
    n_question: int = 0
    """Question tokens at the start of `input_ids` (for the optional question loss)."""


def tokenize_example(tokenizer, ex) -> TokenizedExample:
    """The official sequence format: `question + "\n"`, each `step + "\n"`, `"### " + answer`,
    EOS. A token `<unk>` anywhere is an error (it could make two different answers equal)."""
    from lens_steer.errors import DataError

    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    t = TokenizedExample(
        question=enc(ex.question + "\n"), steps=[enc(s + "\n") for s in ex.steps],
        answer=enc(f"{SEP} {ex.answer}") + [tokenizer.eos_token_id])
    unk = tokenizer.unk_token_id
    if unk is not None and unk in [*t.question, *(x for s in t.steps for x in s), *t.answer]:
        words = [w for w in (ex.question + " " + ex.answer).replace(".", " ").replace("?", " ")
                 .split() if unk in enc(w)]
        raise DataError(f"the tokenizer does not cover {sorted(set(words))[:8]} (<unk>): use a "
                        "covering tokenizer (tokenizer='bpe', a byte-level BPE) or add the words "
                        "to the word list (vocab_words(extra=...))")
    return t


def scheduled_stage(epoch: int, epochs_per_stage: int, stage0_epochs: int | None = None) -> int:
    """Curriculum stage of `epoch`: `stage0_epochs` (default `epochs_per_stage`) epochs of stage 0,
    then `epochs_per_stage` epochs per stage."""
    first = epochs_per_stage if stage0_epochs is None else stage0_epochs
    return 0 if epoch < first else 1 + (epoch - first) // epochs_per_stage


def stage_plan(stage: int, n_steps: int, *, c: int, max_latent_stage: int,
               pad_latent_to_max: bool) -> tuple[int, int]:
    """(steps removed, latents) at curriculum `stage` for a problem with `n_steps` steps.

    Stage s <= max_latent_stage removes the first s steps and puts s*c latents in their place
    (min(s, n_steps)*c unless `pad_latent_to_max`); past max_latent_stage all steps are removed
    and the latent count stays at the max_latent_stage level.
    """
    if stage > max_latent_stage:
        n_skip, n_lat_stage = n_steps, max_latent_stage
    else:
        n_skip, n_lat_stage = min(stage, n_steps), stage
    n_lat = n_lat_stage if pad_latent_to_max else min(n_lat_stage, n_steps)
    return n_skip, n_lat * c


def build_sequence(ex: TokenizedExample, mode: str, ids: LatentIds | None = None, *,
                   stage: int = 0, c: int = 1, max_latent_stage: int = 6,
                   pad_latent_to_max: bool = True) -> Sequence:
    """The training sequence of `ex` under `mode` (and curriculum `stage` for Coconut)."""
    q = list(ex.question)
    if mode == "coconut":
        assert ids is not None
        n_skip, n_lat = stage_plan(stage, len(ex.steps), c=c, max_latent_stage=max_latent_stage,
                                   pad_latent_to_max=pad_latent_to_max)
        prefix = q + [ids.start] + [ids.latent] * n_lat + [ids.end]
        tail = [t for s in ex.steps[n_skip:] for t in s] + ex.answer
        return Sequence(prefix + tail, [IGNORE] * len(prefix) + tail, len(q) + 1, n_lat, len(q))
    if mode == "cot":
        tail = [t for s in ex.steps for t in s] + ex.answer
    elif mode == "nocot":
        tail = list(ex.answer)
    else:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return Sequence(q + tail, [IGNORE] * len(q) + tail, len(q), 0, len(q))


def build_prompt(ex: TokenizedExample, mode: str, ids: LatentIds | None = None,
                 n_latents: int = 0) -> list[int]:
    """The generation prompt: the question (+ markers and `n_latents` latents for Coconut)."""
    if mode == "coconut":
        assert ids is not None
        return list(ex.question) + [ids.start] + [ids.latent] * n_latents + [ids.end]
    return list(ex.question)


def collate(seqs: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to align anchors, right-pad to equal length; labels -100 on padding.

    `question_labels` holds the question tokens (its first token excluded: nothing predicts it)
    and -100 elsewhere, for the optional auxiliary loss on the question (`TrainConfig`).
    """
    A = max(s.anchor for s in seqs)
    L = max(A - s.anchor + len(s.input_ids) for s in seqs)
    ids, labels, mask, qlabels = [], [], [], []
    for s in seqs:
        left = A - s.anchor
        right = L - left - len(s.input_ids)
        ids.append([pad_id] * left + s.input_ids + [pad_id] * right)
        labels.append([IGNORE] * left + s.labels + [IGNORE] * right)
        mask.append([0] * left + [1] * len(s.input_ids) + [0] * right)
        q = [IGNORE] + s.input_ids[1:s.n_question] if s.n_question else []
        qlabels.append([IGNORE] * left + q + [IGNORE] * (L - left - len(q)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask), "question_labels": torch.tensor(qlabels)}
