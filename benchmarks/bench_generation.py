"""Generation speed: steered / unsteered per backend, and backend / plain HF `generate`."""

from __future__ import annotations

import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.timing import median_ratio


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
    for backend in ("transformer_lens", "nnsight"):
        model = load_model(path, backend=backend)
        vec = torch.randn(model.d_model)
        steer = [Intervention(model.n_layers // 2, vec, NewestPosition())]
        runs = {"unsteered": partial(model.generate, prompts, cfg),
                "steered": partial(model.generate, prompts, cfg, steer), "hf": hf_generate}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):  # interleaved, so drift hits all three alike
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        med["ratio"] = median_ratio(times["steered"], times["unsteered"])
        rows.append((backend, med))
    torch.set_num_threads(threads)
    lines = [
        f"Tiny Qwen2 (d_model 128, 4 layers), batch {batch}, {new_tokens} new tokens, greedy, "
        f"1 torch thread, median of {repeats} interleaved runs (the ratio is the median of the "
        "per-round steered / unsteered ratios, robust to drift between rounds). Steering: one vector at the middle layer on the "
        "newest position of every step (ASC-style).",
        "",
        "| backend | unsteered (s) | steered (s) | steered / unsteered | steering cost per step "
        "(ms) | HF generate (s) | backend / HF |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, med in rows:
        lines.append(
            f"| {backend} | {med['unsteered']:.3f} | {med['steered']:.3f} | "
            f"{med['ratio']:.3f} | "
            f"{1000 * (med['steered'] - med['unsteered']) / new_tokens:+.2f} | {med['hf']:.3f} | "
            f"{med['unsteered'] / med['hf']:.2f} |")
    return "\n".join(lines) + "\n"
