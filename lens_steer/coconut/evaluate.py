"""Greedy answers after k continuous thoughts (or after CoT / directly): accuracy and token counts.

    metrics, records = evaluate(model, tok, ids, examples, mode="coconut", n_latents=6)
    metrics["accuracy"], metrics["mean_generated_tokens"], metrics["mean_tokens_incl_latents"]
    metrics["option_rate"]      # answers naming one of the question's two options

A record's `answer_kind` says which node the answer names: `target` (correct), `neg_target`
(the other option), `other_node` (a node of this graph that is not an option), `not_a_node`
(a concept absent from this graph), `no_answer` (no `###`); None for ProntoQA-style problems.
"""

from __future__ import annotations

import torch

from lens_steer.coconut.curriculum import build_prompt, tokenize_example
from lens_steer.coconut.model import SEP, LatentIds, generate


def split_answer(tokenizer, gen: list[int]) -> list[int] | None:
    """Answer tokens after the last `###` in `gen` (None when there is no separator)."""
    sep = tokenizer.convert_tokens_to_ids(SEP)
    if sep not in gen:
        return None
    return gen[len(gen) - gen[::-1].index(sep):]


ANSWER_KINDS = ("target", "neg_target", "other_node", "not_a_node", "no_answer")


def answer_kind(tokenizer, ex, ans: list[int] | None) -> str | None:
    """Which node the answer tokens `ans` name (see the module docstring); None when `ex`'s
    answer does not name its target (ProntoQA-style `True.` / `False.`)."""
    names = ex.idx_to_symbol
    if names[ex.target] not in ex.answer.replace(".", " ").split():
        return None
    if ans is None:
        return "no_answer"
    words = [w for w in tokenizer.convert_ids_to_tokens(ans) if w.isalnum()]
    words = [w for w in words if w not in (names[ex.root], "is", "a")]
    if not words:
        return "not_a_node"
    w = words[-1]
    if w == names[ex.target]:
        return "target"
    if w == names[ex.neg_target]:
        return "neg_target"
    return "other_node" if w in names else "not_a_node"


@torch.no_grad()
def evaluate(model, tokenizer, ids: LatentIds, examples, *, mode: str, n_latents: int = 0,
             batch_size: int = 64, max_new_tokens: int = 64) -> tuple[dict, list[dict]]:
    """Exact-match answer accuracy and generated-token counts over `examples` (ProsQAExample)."""
    was_training = model.training
    model.eval()
    records = []
    toks = [tokenize_example(tokenizer, e) for e in examples]
    for i in range(0, len(toks), batch_size):
        chunk = toks[i:i + batch_size]
        prompts = [build_prompt(t, mode, ids, n_latents if mode == "coconut" else 0) for t in chunk]
        gens, _ = generate(model, prompts, latent_id=ids.latent, eos_id=tokenizer.eos_token_id,
                           pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens)
        for j, (t, g) in enumerate(zip(chunk, gens, strict=True)):
            ex = examples[i + j]
            ans = split_answer(tokenizer, g)
            gold = t.answer[1:-1]                            # drop ### and <eos>
            records.append({
                "index": i + j, "mode": mode, "hops": len(ex.steps),
                "correct": ans == gold, "generated": tokenizer.decode(g),
                "answer_kind": answer_kind(tokenizer, ex, ans),
                "gold": ex.answer, "n_generated_tokens": len(g),          # EOS not counted
                "n_latents": n_latents if mode == "coconut" else 0,
            })
    model.train(was_training)
    n = max(len(records), 1)
    by_hops: dict[int, list[bool]] = {}
    for r in records:
        by_hops.setdefault(r["hops"], []).append(r["correct"])
    metrics = {
        "mode": mode, "n": len(records),
        "accuracy": sum(r["correct"] for r in records) / n,
        "mean_generated_tokens": sum(r["n_generated_tokens"] for r in records) / n,
        "mean_tokens_incl_latents": sum(r["n_generated_tokens"] + r["n_latents"]
                                        for r in records) / n,
        "accuracy_by_hops": {h: sum(v) / len(v) for h, v in sorted(by_hops.items())},
    }
    kinds = [r["answer_kind"] for r in records if r["answer_kind"] is not None]
    if kinds:
        metrics["answer_kinds"] = {k: kinds.count(k) / len(kinds) for k in ANSWER_KINDS}
        metrics["option_rate"] = (kinds.count("target") + kinds.count("neg_target")) / len(kinds)
    return metrics, records
