"""Greedy evaluation of a toy reasoner on held-out problems: accuracy, length, thought mix.

    from lens_steer.toy.evaluate import evaluate
    metrics = evaluate("toy", n=500, out_dir="runs/toy_eval")   # metrics.json + records.jsonl
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lens_steer.io import read_json, write_json, write_jsonl
from lens_steer.thoughts import label_thought, split_thoughts
from lens_steer.toy.problems import THINK, ToyProblem, generate_problems

EVAL_SEED = 1_000_003
"""Seed of the held-out problems (training uses small seeds; overlaps are filtered anyway)."""
KINDS = ("execution", "reflection", "transition")


def heldout_problems(n: int, seed: int = EVAL_SEED, exclude: set[str] | None = None
                     ) -> list[ToyProblem]:
    """`n` problems from `seed` whose question is not in `exclude` (the training questions)."""
    exclude = exclude or set()
    out: list[ToyProblem] = []
    batch = 0
    while len(out) < n:
        # later batches get seeds far from `seed + 1`, so neighbouring seeds' splits stay apart
        batch_seed = seed if batch == 0 else seed * 100_003 + batch
        out += [p for p in generate_problems(2 * n, batch_seed) if p.question not in exclude]
        batch += 1
    return out[:n]


def training_questions(model_dir: str | Path) -> set[str]:
    """Questions of every training stage of a toy model directory (`training_recipe.json`,
    else `training_config.json`); empty for a directory without either."""
    model_dir = Path(model_dir)
    recipe, single = model_dir / "training_recipe.json", model_dir / "training_config.json"
    configs = ([st["config"] for st in read_json(recipe)["stages"]] if recipe.exists()
               else [read_json(single)] if single.exists() else [])
    return {p.question for c in configs if "n_problems" in c and "seed" in c
            for p in generate_problems(c["n_problems"], c["seed"])}


def load_hf(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(Qwen2ForCausalLM, PreTrainedTokenizerFast) from a saved directory ("toy" = shipped)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if str(model_dir) == "toy":
        from lens_steer.toy import TOY_MODEL_DIR

        model_dir = TOY_MODEL_DIR
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return model, tok


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256,
                    batch_size: int = 64, progress: bool = True) -> list[tuple[str, int]]:
    """Greedy completions (text without EOS/pad, number of generated tokens) via HF generate."""
    out: list[tuple[str, int]] = []
    tokenizer.padding_side = "left"
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                        add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            ids = [t for t in row if t != tokenizer.pad_token_id]
            if tokenizer.eos_token_id in ids:
                ids = ids[:ids.index(tokenizer.eos_token_id) + 1]
            text = tokenizer.decode([t for t in ids if t != tokenizer.eos_token_id])
            out.append((text, len(ids)))
    return out


def extract_number(text: str) -> int | None:
    """The integer in the last `\\boxed{...}` of `text`, or None."""
    from lens_steer.eval.answers import extract_answer

    ans = extract_answer(text, style="boxed")
    try:
        return int(str(ans).strip())
    except (TypeError, ValueError):
        return None


def thought_labels(completion: str) -> list[str]:
    """SEAL labels of the thoughts in a completion generated after the `<think>\\n` prompt."""
    return [label_thought(t) for t in split_thoughts(f"{THINK}\n{completion}")]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, mean generated tokens and thought counts per trace (overall and by correctness)."""
    def block(rows: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(1, len(rows))
        counts = Counter(k for r in rows for k in r["thought_labels"])
        total = max(1, sum(counts.values()))
        return {
            "n": len(rows),
            "mean_tokens": sum(r["n_tokens"] for r in rows) / n,
            "thoughts_per_trace": {k: counts[k] / n for k in KINDS},
            "thought_share": {k: counts[k] / total for k in KINDS},
            "reflection_transition_per_trace": (counts["reflection"] + counts["transition"]) / n,
            "concise_share": sum(r["style"] == "concise" for r in rows) / n,
        }

    out = {"accuracy": sum(r["correct"] for r in records) / max(1, len(records)),
           **block(records)}
    out["by_correctness"] = {"correct": block([r for r in records if r["correct"]]),
                             "incorrect": block([r for r in records if not r["correct"]])}
    return out


def evaluate(model_or_dir: Any = "toy", n: int = 500, seed: int = EVAL_SEED,
             out_dir: str | Path | None = None, max_new_tokens: int = 256, batch_size: int = 64,
             progress: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """Greedy-decode `n` held-out problems; write `metrics.json` and `records.jsonl` to `out_dir`.

    `model_or_dir`: a model directory, "toy", or a `(model, tokenizer)` pair. Problems whose
    question occurs in any training stage (`training_questions`) are skipped.
    `threads`: torch intra-op threads (None leaves the setting alone).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    exclude: set[str] = set()
    source = "in-memory model"
    if isinstance(model_or_dir, tuple):
        model, tok = model_or_dir
    else:
        model, tok = load_hf(model_or_dir)
        from lens_steer.toy import TOY_MODEL_DIR

        model_dir = Path(TOY_MODEL_DIR if str(model_or_dir) == "toy" else model_or_dir)
        source = str(model_dir)
        exclude = training_questions(model_dir)
    problems = heldout_problems(n, seed, exclude)
    t0 = time.time()
    gens = generate_greedy(model, tok, [p.prompt for p in problems], max_new_tokens,
                           batch_size, progress)
    wall = time.time() - t0
    records = []
    for p, (text, n_tok) in zip(problems, gens, strict=True):
        pred = extract_number(text)
        inner = text.split("</think>")[0]
        records.append({
            "question": p.question, "answer": p.answer, "generated": text, "extracted": pred,
            "correct": pred == p.answer, "n_tokens": n_tok,
            "style": "verbose" if "\n\n" in inner else "concise",
            "thought_labels": thought_labels(text), "n_steps": len(p.steps),
        })
    metrics = {**summarize(records), "n_problems": len(records), "seed": seed,
               "max_new_tokens": max_new_tokens, "decoding": "greedy", "model": source,
               "generation_wall_time_s": round(wall, 1)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_jsonl(out_dir / "records.jsonl", records)
        write_json(out_dir / "metrics.json", metrics)
    return metrics
