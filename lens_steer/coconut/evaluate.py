"""Greedy answers after k continuous thoughts (or after CoT / directly): accuracy and token counts.

    metrics, records = evaluate(model, tok, ids, examples, mode="coconut", n_latents=6)
    metrics["accuracy"], metrics["mean_generated_tokens"], metrics["mean_tokens_incl_latents"]
    metrics["option_rate"]      # answers naming one of the question's two options
    metrics["chain"]            # CoT: how its written steps walk the graph (`chain_quality`)

A record's `answer_kind` says which node the answer names: `target` (correct), `neg_target`
(the other option), `other_node` (a node of this graph that is not an option), `not_a_node`
(a concept absent from this graph), `no_answer` (no `###`); None for ProntoQA-style problems.
"""

from __future__ import annotations

import torch

from lens_steer.coconut.curriculum import build_prompt, tokenize_example
from lens_steer.coconut.model import LatentIds, generate


def answer_text(tokenizer, gen: list[int]) -> str | None:
    """The answer as the official code reads it: the decoded output (special tokens dropped)
    after its last `#`, stripped; None when there is no `#`."""
    text = tokenizer.decode(gen, skip_special_tokens=True)
    return text.split("#")[-1].strip() if "#" in text else None


def same_answer(a: str | None, gold: str) -> bool:
    """Official comparison (commas dropped, stripped), also blind to whitespace so that word-
    and subword-level decoders agree (`Tom wumpus .` == `Tom wumpus.`)."""
    norm = lambda s: "".join(s.replace(",", "").split())  # noqa: E731
    return a is not None and norm(a) == norm(gold)


ANSWER_KINDS = ("target", "neg_target", "other_node", "not_a_node", "no_answer")


def answer_kind(ex, ans: str | None) -> str | None:
    """Which node the answer text `ans` names (see the module docstring); None when `ex` has
    no graph or its answer does not name its target (ProntoQA-style `True.` / `False.`)."""
    import re

    names = ex.idx_to_symbol
    if not names or names[ex.target] not in re.findall(r"\w+", ex.answer):
        return None
    if ans is None:
        return "no_answer"
    words = [w for w in re.findall(r"\w+", ans) if w not in (names[ex.root], "is", "a")]
    if not words:
        return "not_a_node"
    w = words[-1]
    if w == names[ex.target]:
        return "target"
    if w == names[ex.neg_target]:
        return "neg_target"
    return "other_node" if w in names else "not_a_node"


def chain_quality(ex, generated: str) -> dict | None:
    """How a written chain walks the graph of `ex`: the steps before `#` parsed as `u is a v`
    (or compact `u v .`) statements. None when `ex` has no graph. Keys: `n_steps`,
    `steps_are_edges` (fraction), `valid` (every step an edge, each starting where the last
    ended, the first at the root), `gold` (exactly the gold path), `end` (kind of the last
    node: target / neg_target / other_leaf / inner; None without steps)."""
    import re

    names = ex.idx_to_symbol
    if not names:
        return None
    index = {n: i for i, n in enumerate(names)}
    edges = {tuple(e) for e in ex.edges}
    pairs = []
    for sentence in generated.split("#")[0].split("."):
        words = [w for w in re.findall(r"\w+", sentence) if w not in ("Every", "is", "a", "an")]
        if len(words) == 2 and all(w in index for w in words):
            pairs.append((index[words[0]], index[words[1]]))
        elif words:
            pairs.append((-1, -1))                  # a statement that names no two nodes
    on_edge = [p in edges for p in pairs]
    at = [ex.root] + [v for _, v in pairs]
    valid = bool(pairs) and all(on_edge) and all(u == at[i] for i, (u, _) in enumerate(pairs))
    path = _gold_path(ex)
    gold = list(zip(path, path[1:], strict=False))
    end = None
    if pairs:
        last = pairs[-1][1]
        children = {u for u, _ in edges}
        end = ("target" if last == ex.target else "neg_target" if last == ex.neg_target
               else "inner" if last in children else "other_leaf")
    return {"n_steps": len(pairs), "steps_are_edges": sum(on_edge) / max(len(pairs), 1),
            "valid": valid, "gold": pairs == gold, "end": end}


def _gold_path(ex) -> list[int]:
    """Root, then the object of each gold step."""
    import re

    index = {n: i for i, n in enumerate(ex.idx_to_symbol)}
    path = [ex.root]
    for step in ex.steps:
        words = [w for w in re.findall(r"\w+", step) if w in index]
        if words:
            path.append(index[words[-1]])
    return path


@torch.no_grad()
def evaluate(model, tokenizer, ids: LatentIds, examples, *, mode: str, n_latents: int = 0,
             batch_size: int = 64, max_new_tokens: int = 128) -> tuple[dict, list[dict]]:
    """Exact-match answer accuracy and generated-token counts over `examples` (ProsQAExample).

    `model`: a HF causal LM or a `ModelBackend`. 128 new tokens, as the official ProsQA and
    ProntoQA evaluation (GSM8k: 64)."""
    module = isinstance(model, torch.nn.Module)          # else a ModelBackend (already eval)
    was_training = module and model.training
    if module:
        model.eval()
    records = []
    toks = [tokenize_example(tokenizer, e) for e in examples]
    for i in range(0, len(toks), batch_size):
        chunk = toks[i:i + batch_size]
        prompts = [build_prompt(t, mode, ids, n_latents if mode == "coconut" else 0) for t in chunk]
        gens, _ = generate(model, prompts, latent_id=ids.latent, eos_id=tokenizer.eos_token_id,
                           pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens)
        for j, g in enumerate(gens):
            ex = examples[i + j]
            ans = answer_text(tokenizer, g)
            records.append({
                "index": i + j, "mode": mode, "hops": len(ex.steps),
                "correct": same_answer(ans, ex.answer), "generated": tokenizer.decode(g),
                "answer": ans, "answer_kind": answer_kind(ex, ans),
                "gold": ex.answer, "n_generated_tokens": len(g),          # EOS not counted
                "n_latents": n_latents if mode == "coconut" else 0,
            })
    if module:
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
    if mode == "cot":
        chains = [q for r, e in zip(records, examples, strict=True)
                  if (q := chain_quality(e, r["generated"])) is not None]
        if chains:
            ends = [q["end"] for q in chains]
            metrics["chain"] = {
                "steps_are_edges": sum(q["steps_are_edges"] for q in chains) / len(chains),
                "valid": sum(q["valid"] for q in chains) / len(chains),
                "gold": sum(q["gold"] for q in chains) / len(chains),
                "ends": {k: ends.count(k) / len(ends)
                         for k in ("target", "neg_target", "other_leaf", "inner", None)}}
    kinds = [r["answer_kind"] for r in records if r["answer_kind"] is not None]
    if kinds:
        metrics["answer_kinds"] = {k: kinds.count(k) / len(kinds) for k in ANSWER_KINDS}
        metrics["option_rate"] = (kinds.count("target") + kinds.count("neg_target")) / len(kinds)
    return metrics, records
