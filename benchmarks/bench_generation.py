"""Generation speed: steered / unsteered per backend, backend / plain HF `generate`, both decode
paths (plain HF modules with torch hooks, the default; and the backend's own machinery,
`LENS_STEER_FAST_DECODE=0`), and a batch whose sequences finish at very different steps."""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from benchmarks.timing import interleaved, median_ratio

OWN = {"transformer_lens": "bridge", "nnsight": "nnsight trace"}


@contextmanager
def _fast(on: bool):
    old = os.environ.get("LENS_STEER_FAST_DECODE")
    os.environ["LENS_STEER_FAST_DECODE"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LENS_STEER_FAST_DECODE", None)
        else:
            os.environ["LENS_STEER_FAST_DECODE"] = old


def _on(path_on: bool, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with _fast(path_on):
            return fn()
    return run


def run(quick: bool = False) -> str:
    from transformers import AutoModelForCausalLM

    from lens_steer import GenerationConfig, Intervention, NewestPosition, load_model
    from lens_steer.testing import build_tiny_model

    path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "qwen2", d_model=128, n_layers=4)
    repeats = 3 if quick else 15
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and least noisy here
    new_tokens, batch = (16, 4) if quick else (64, 8)
    prompts = [[5 + i, 6, 7, 8, 9, 10 + i, 11, 12] for i in range(batch)]
    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False, batch_size=batch)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor(prompts)

    def hf_generate() -> None:
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)

    rows = []
    try:
        for backend in ("transformer_lens", "nnsight"):
            model = load_model(path, backend=backend)
            vec = torch.randn(model.d_model)
            steer = [Intervention(model.n_layers // 2, vec, NewestPosition())]
            runs = {"unsteered": _on(True, partial(model.generate, prompts, cfg)),
                    "steered": _on(True, partial(model.generate, prompts, cfg, steer)),
                    "own": _on(False, partial(model.generate, prompts, cfg)),
                    "own_steered": _on(False, partial(model.generate, prompts, cfg, steer)),
                    "hf": hf_generate}
            times = interleaved(runs, repeats)
            for label, un, st in (("HF modules + torch hooks", "unsteered", "steered"),
                                  (OWN[backend], "own", "own_steered")):
                rows.append((backend, label, statistics.median(times[un]),
                             statistics.median(times[st]), median_ratio(times[st], times[un]),
                             statistics.median(times["hf"]), median_ratio(times[un],
                                                                          times["hf"])))
        ragged = _ragged(quick, max(2, repeats // 3))
    finally:
        torch.set_num_threads(threads)
    lines = [
        f"Tiny Qwen2 (d_model 128, 4 layers), batch {batch}, {new_tokens} new tokens, greedy, "
        f"1 torch thread, {repeats} interleaved rounds; times are medians, ratios the median of "
        "the per-round ratios (side by side in one round, robust to drift and to the shared "
        "CPU's load). Steering: one vector at the middle layer on the newest position of every "
        "step (ASC-style). Decode path: the default (decode steps on the HF modules, sites by "
        "torch hooks) or the backend's own (`LENS_STEER_FAST_DECODE=0`).",
        "",
        "| backend | decode path | unsteered (s) | steered (s) | steered / unsteered | "
        "HF generate (s) | backend / HF |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, label, un, st, ratio, hf_s, vs_hf in rows:
        lines.append(f"| {backend} | {label} | {un:.3f} | {st:.3f} | {ratio:.3f} | {hf_s:.3f} "
                     f"| {vs_hf:.2f} |")
    lines += ["", ragged]
    return "\n".join(lines) + "\n"


def _ragged(quick: bool, repeats: int) -> str:
    """The toy reasoner on problems whose answers end at very different steps (EOS on): the
    shared loop drops finished rows, HF `generate` decodes them until the longest ends."""
    from transformers import AutoModelForCausalLM

    from lens_steer import GenerationConfig, load_model
    from lens_steer.backends.loading import resolve_source
    from lens_steer.toy.problems import generate_problems

    n, limit = (4, 60) if quick else (16, 400)
    hf = AutoModelForCausalLM.from_pretrained(resolve_source("toy")).eval()
    runs: dict[str, Callable[[], object]] = {}
    lengths = None
    for backend in ("transformer_lens", "nnsight"):
        model = load_model("toy", backend=backend)
        enc = [model.encode(p.prompt) for p in generate_problems(n, seed=3)]
        cfg = GenerationConfig(max_new_tokens=limit, batch_size=n)
        runs[backend] = _on(True, partial(model.generate, enc, cfg))
        lengths = lengths or sorted(len(g) for g in model.generate(enc, cfg).generated_ids)
    ids, mask = model.pad_batch(enc)
    tok = model.tokenizer

    def hf_generate() -> None:
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=limit, do_sample=False,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    runs["hf"] = hf_generate
    times = interleaved(runs, repeats)
    lines = [f"Batch finishing at very different steps: the toy reasoner, {n} problems, EOS on, "
             f"{lengths[0]} to {lengths[-1]} generated tokens, {repeats} interleaved rounds.", "",
             "| run | time (s) | / HF generate |", "|---|---|---|"]
    for name in runs:
        lines.append(f"| {name} | {statistics.median(times[name]):.2f} | "
                     f"{median_ratio(times[name], times['hf']):.2f} |")
    return "\n".join(lines)
