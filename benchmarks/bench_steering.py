"""Steering speed: SEAL / ASC steered vs unsteered generation per backend, and the ASC gamma
calibration time per state."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import median_ratio


def _model_source() -> tuple[str, str]:
    import os

    from lens_steer.toy import TOY_MODEL_DIR

    override = os.environ.get("LENS_STEER_BENCH_MODEL")
    if override:
        return override, f"the model at {override} ($LENS_STEER_BENCH_MODEL)"

    if (Path(TOY_MODEL_DIR) / "config.json").exists():
        return "toy", "the shipped toy reasoner"
    from lens_steer.testing import build_tiny_model

    path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "qwen2", d_model=256, n_layers=6,
                            n_heads=8, n_kv_heads=4)
    return str(path), "a random tiny Qwen2 (d_model 256, 6 layers; the toy model was absent)"


def run(quick: bool = False) -> str:
    from lens_steer import GenerationConfig, load_model
    from lens_steer.steering import (
        SteeringVector,
        asc_intervention,
        calibrate_gamma,
        sample_states,
        seal_intervention,
    )
    from lens_steer.toy.problems import generate_problems

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small model on a shared CPU: one thread is fastest and steadiest
    try:
        source, described = _model_source()
        repeats = 3 if quick else 9
        new_tokens, batch = (24, 8) if quick else (96, 16)
        n_states = 4 if quick else 16
        problems = generate_problems(batch + n_states, seed=424242)
        prompts = [p.prompt for p in problems[:batch]]
        cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False, batch_size=batch)
        rows, calib = [], []
        for backend in ("transformer_lens", "nnsight"):
            model = load_model(source, backend=backend)
            layer = round(2 * model.n_layers / 3)
            gen = torch.Generator().manual_seed(0)
            seal = SteeringVector(layer, torch.randn(model.d_model, generator=gen), "seal",
                                  rule="think_delimiter")
            asc = SteeringVector(layer, torch.randn(model.d_model, generator=gen), "asc")
            runs = {"unsteered": [], "seal": [seal_intervention(model, seal, 1.0)],
                    "asc": [asc_intervention(model, asc, 1.0)]}
            times: dict[str, list[float]] = {k: [] for k in runs}
            sites: dict[str, int] = {}
            for name, ivs in runs.items():  # warm-up
                sites[name] = len(model.generate(prompts, cfg, ivs).steered)
            for _ in range(repeats):  # interleaved, so drift hits all alike
                for name, ivs in runs.items():
                    t0 = time.perf_counter()
                    model.generate(prompts, cfg, ivs)
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            med |= {f"{k}_ratio": median_ratio(times[k], times["unsteered"])
                    for k in ("seal", "asc")}
            rows.append((backend, med, sites))
            states = sample_states(model, [(p.prompt, p.verbose_trace)
                                           for p in problems[batch:]], n_states, seed=0)
            t0 = time.perf_counter()
            cal = calibrate_gamma(model, asc, states, measure=False)
            calib.append((backend, cal.seconds_per_state, time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    lines = [
        f"Model: {described}. Batch {batch}, {new_tokens} new tokens (EOS ignored, so every run "
        f"writes the same tokens), greedy, 1 torch thread, median of {repeats} interleaved runs (ratios: median of the "
        "per-round ratios). "
        "SEAL: alpha·S on steps whose newest token is a `\\n\\n` delimiter inside `<think>`; "
        "ASC: gamma·v̂ on the newest position of every step. Default decode path on both "
        "backends (decode steps on the HF modules, one torch hook per steered site for the "
        "whole generation; see the generation section for the backends' own paths).", "",
        "| backend | unsteered (s) | SEAL (s) | SEAL / unsteered | SEAL sites | ASC (s) | "
        "ASC / unsteered | ASC sites |", "|---|---|---|---|---|---|---|---|"]
    for backend, med, sites in rows:
        lines.append(
            f"| {backend} | {med['unsteered']:.3f} | {med['seal']:.3f} | "
            f"{med['seal_ratio']:.3f} | {sites['seal']} | {med['asc']:.3f} | "
            f"{med['asc_ratio']:.3f} | {sites['asc']} |")
    lines += ["", f"ASC gamma calibration (‖J v̂‖ and ‖H v̂‖ by nested forward-mode AD, "
                  f"{n_states} states of prompt + partial trace):", "",
              "| backend | seconds per state | total (s) |", "|---|---|---|"]
    for backend, per, total in calib:
        lines.append(f"| {backend} | {per:.3f} | {total:.2f} |")
    return "\n".join(lines) + "\n"
