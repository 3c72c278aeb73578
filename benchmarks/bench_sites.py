"""Sites and operations: capture at any site vs the resid_post capture, and ablation / patch
hooks during generation vs unsteered, per backend (issue 17.7: both within 1.05x)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import torch

from benchmarks.bench_steering import _model_source
from benchmarks.timing import interleaved, median_ratio

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


def run(quick: bool = False) -> str:
    from lens_steer import load_model
    from lens_steer.toy.problems import generate_problems

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source, described = _model_source()
        repeats = 3 if quick else 9
        new_tokens, batch = (16, 8) if quick else (64, 16)
        problems = generate_problems(batch, seed=515151)
        capture_rows, gen_rows = [], []
        for backend in ("transformer_lens", "nnsight"):
            cap, gen = _bench(load_model(source, backend=backend), problems, batch, new_tokens,
                              repeats)
            capture_rows.append((backend, *cap))
            gen_rows.append((backend, *gen))
    finally:
        torch.set_num_threads(threads)
    kinds = list(capture_rows[0][2])
    lines = [
        f"Model: {described}. 1 torch thread, median of {repeats} interleaved runs (ratios: "
        "median of the per-round ratios).", "",
        f"Capture: {batch} traces (<= 192 tokens), every 8th position, 3 layers; each site vs "
        "today's `capture_resid` (resid_post).", "",
        "| backend | resid_post (s) | " + " | ".join(f"{k} / resid_post" for k in kinds) + " |",
        "|---|---|" + "---|" * len(kinds)]
    for backend, med, ratio in capture_rows:
        lines.append(f"| {backend} | {med['resid_post']:.3f} | "
                     + " | ".join(f"{ratio[k]:.3f}" for k in kinds) + " |")
    ops = list(gen_rows[0][2])
    lines += ["", f"Generation: batch {batch}, {new_tokens} new tokens, greedy; the operation "
                  "at the middle block on every position (patch: 20 prompt positions).", "",
              "| backend | unsteered (s) | " + " | ".join(f"{k} / unsteered" for k in ops)
              + " |", "|---|---|" + "---|" * len(ops)]
    for backend, med, ratio in gen_rows:
        lines.append(f"| {backend} | {med['unsteered']:.3f} | "
                     + " | ".join(f"{ratio[k]:.3f}" for k in ops) + " |")
    return "\n".join(lines) + "\n"


def _bench(model: ModelBackend, problems, batch: int, new_tokens: int, repeats: int):
    """(capture medians, ratios), (generation medians, ratios) for one backend."""
    from lens_steer import AtPositions, GenerationConfig, Intervention

    seqs = [model.encode(p.prompt + p.verbose_trace)[:192] for p in problems]
    positions = [list(range(0, len(s), 8)) for s in seqs]
    layers = [model.n_layers // 3, model.n_layers // 2, 2 * model.n_layers // 3]
    kinds = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "attn.hook_z"]
    cap = {"resid_post": lambda layers=layers: model.capture_resid(seqs, layers,
                                                                   positions)}
    for kind in kinds:
        hook = kind if kind.startswith("attn.") else f"hook_{kind}"
        names = [f"blocks.{layer}.{hook}" for layer in layers]
        cap[kind] = lambda names=names: model.capture(seqs, names, positions)
    times = interleaved(cap, repeats)
    cap_out = ({k: statistics.median(v) for k, v in times.items()},
               {k: median_ratio(times[k], times["resid_post"]) for k in kinds})

    mid = model.n_layers // 2
    prompts = [p.prompt for p in problems]
    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False,
                           batch_size=batch)
    source_acts = model.capture([seqs[0]], [f"blocks.{mid}.hook_resid_post"],
                                [list(range(len(seqs[0])))])
    ops = {
        "unsteered": [],
        "zero head": [Intervention.zero_ablate(f"blocks.{mid}.attn.hook_z", head=0)],
        "mean-ablate MLP": [Intervention.mean_ablate(
            f"blocks.{mid}.hook_mlp_out", torch.zeros(model.d_model))],
        "project out": [Intervention.project_out(f"blocks.{mid}.hook_resid_pre",
                                                 torch.ones(model.d_model))],
        "patch": [Intervention.patch(f"blocks.{mid}.hook_resid_post",
                                     source_acts[f"blocks.{mid}.hook_resid_post"],
                                     AtPositions(tuple(range(0, 40, 2))))],
    }
    runs = {k: (lambda ivs=ivs: model.generate(prompts, cfg, ivs)) for k, ivs in
            ops.items()}
    times = interleaved(runs, repeats)
    gen_out = ({k: statistics.median(v) for k, v in times.items()},
               {k: median_ratio(times[k], times["unsteered"]) for k in ops if k != "unsteered"})
    return cap_out, gen_out
