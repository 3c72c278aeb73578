"""GPU benchmark on R1-Distill-Qwen-1.5B / 7B shapes with random weights (no download).

    python -m benchmarks.run --device cuda           # one GPU, about 5 minutes in all
    python -m benchmarks.run --device cpu --quick    # dry run on a tiny shape (tests)

Per model: generation throughput (tokens/s) at batch 1, 32, 128 for plain HF `generate` and
both backends, unsteered and ASC-steered (gamma·v̂ on the newest position of every step, the
densest rule); per-thought caching throughput (`cache_thoughts`, all layers); ASC gamma
calibration time per state. Random weights give the same cost as trained ones: generation
ignores EOS, so every run writes exactly the tokens asked for.

Fitting in the time budget: each cell first runs a short warm-up that also times a decode
step; a cell then generates `new_tokens` (1,000) when its fair share of the remaining budget
allows it, and fewer otherwise — the table gives the tokens each cell actually generated. An
out-of-memory cell is recorded as `OOM`, not fatal. Weights are bf16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

import gc
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lens_steer.memory import KNOWN_CONFIGS

# Shapes from `memory.KNOWN_CONFIGS`; the rest from the published config.json of
# deepseek-ai/DeepSeek-R1-Distill-Qwen-{1.5B,7B}.
_R1_COMMON = dict(max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6,
                  hidden_act="silu", use_sliding_window=False, sliding_window=4096,
                  bos_token_id=151643, eos_token_id=151643)
R1_DISTILL_QWEN: dict[str, dict[str, Any]] = {
    f"R1-Distill-Qwen-{size}": {
        **{k: v for k, v in KNOWN_CONFIGS[f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{size}"].items()
           if k != "model_type"},
        **_R1_COMMON, "max_window_layers": window}
    for size, window in (("1.5B", 21), ("7B", 28))}
QUICK_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
BACKENDS = ("transformer_lens", "nnsight")
OOM = "OOM"


@dataclass
class Plan:
    models: dict[str, dict[str, Any]]
    batches: tuple[int, ...] = (1, 32, 128)
    new_tokens: int = 1000
    prompt_len: int = 64
    probe_tokens: int = 8
    n_traces: int = 64
    trace_len: int = 512
    cache_batch: int = 16
    n_states: int = 4
    budget_s: float = 300.0


def make_plan(device: str, quick: bool, budget_s: float | None = None) -> Plan:
    if quick:
        plan = Plan(models={"tiny (quick dry run)": QUICK_SHAPE}, batches=(1, 2), new_tokens=4,
                    prompt_len=8, probe_tokens=2, n_traces=2, trace_len=220, cache_batch=2,
                    n_states=1, budget_s=120.0)
    else:
        plan = Plan(models=dict(R1_DISTILL_QWEN))
    if budget_s is not None:
        plan.budget_s = budget_s
    return plan


@dataclass
class Clock:
    """The time budget: a fair share of what is left for each remaining unit of work."""

    deadline: float
    units_left: float

    def share(self) -> float:
        return max(0.0, self.deadline - time.perf_counter()) / max(self.units_left, 1.0)

    def spend(self, units: float = 1.0) -> None:
        self.units_left = max(0.0, self.units_left - units)


@dataclass
class Results:
    gen: list[dict[str, Any]] = field(default_factory=list)
    cache: list[dict[str, Any]] = field(default_factory=list)
    calib: list[dict[str, Any]] = field(default_factory=list)
    setup: list[dict[str, Any]] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # return freed blocks (and an OOM's leftovers) to the allocator
        gc.collect()
        torch.cuda.empty_cache()


def _failure(err: BaseException) -> str:
    """What a failed measurement records: `OOM`, or the error (printed in full to stderr), so
    one failure costs one cell, not the whole GPU run."""
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return OOM
    traceback.print_exception(err)
    return f"error: {type(err).__name__}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def build_model_dir(out: Path, shape: dict[str, Any], device: torch.device,
                    dtype: torch.dtype) -> tuple[Path, int]:
    """A random-weight Qwen2 of `shape` beside the project's test tokenizer, built on `device`;
    returns the directory and the tokenizer's size (prompts draw ids below it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lens_steer.testing import build_tokenizer

    tok = build_tokenizer(out)
    shape = dict(shape)
    shape.setdefault("vocab_size", len(tok))
    shape.setdefault("eos_token_id", tok.eos_token_id)
    config = Qwen2Config(**shape, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(out)
    del model
    _free(device)
    return out, len(tok)


def _scratch_root(size_gb: float) -> Path:
    """tmpfs when it has room (weights are written once and read by three loaders)."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 1.5 * size_gb * 2**30:
            return Path(tempfile.mkdtemp(dir=shm, prefix="lens_steer_bench_"))
    return Path(tempfile.mkdtemp(prefix="lens_steer_bench_"))


def _n_params(shape: dict[str, Any]) -> float:
    d, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    v = shape.get("vocab_size", 1000)
    return n * (2 * d * d + 2 * d * kv + 3 * d * i) + 2 * v * d


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=gen).tolist()


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _cell(res: Results, clock: Clock, device: torch.device, row: dict[str, Any],
          run: Callable[[int], Any], plan: Plan) -> None:
    """Warm up (and time a step) with `probe_tokens`, then run as many tokens as the share
    allows, up to `plan.new_tokens`."""
    try:
        probe = _timed(lambda: run(plan.probe_tokens), device)
        per_token = probe / plan.probe_tokens
        tokens = int(min(plan.new_tokens, max(plan.probe_tokens, clock.share() / per_token)))
        seconds = _timed(lambda: run(tokens), device)
        row |= {"tokens": tokens, "seconds": seconds, "tok_s": row["batch"] * tokens / seconds}
    except Exception as err:  # noqa: BLE001 - recorded in the table
        row |= {"tokens": 0, "seconds": float("nan"), "tok_s": _failure(err)}
    finally:
        _free(device)
        clock.spend()
    res.gen.append(row)


def _hf_cells(res, clock, plan, name, model_dir, device, dtype, vocab) -> None:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    res.setup.append({"model": name, "what": "load HF", "seconds": time.perf_counter() - t0})
    clock.spend(0.5)
    for batch in plan.batches:
        ids = torch.tensor(_prompts(batch, plan.prompt_len, vocab, seed=batch), device=device)

        def run(n: int, ids=ids) -> None:
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0)

        _cell(res, clock, device, {"model": name, "runner": "HF generate", "steered": "—",
                                   "batch": batch}, run, plan)
    del hf
    _free(device)


def _backend_cells(res, clock, plan, name, model_dir, backend, device, dtype, vocab) -> None:
    from benchmarks.bench_cache import make_traces
    from lens_steer import GenerationConfig, load_model
    from lens_steer.cache import CacheConfig, cache_thoughts
    from lens_steer.steering import SteeringVector, asc_intervention, calibrate_gamma

    t0 = time.perf_counter()
    model = load_model(model_dir, backend=backend, device=device, dtype=dtype)
    res.setup.append({"model": name, "what": f"load {backend}",
                      "seconds": time.perf_counter() - t0})
    clock.spend(0.5)
    layer = round(2 * model.n_layers / 3)
    vec = SteeringVector(layer, torch.randn(model.d_model, generator=torch.Generator()
                                            .manual_seed(0)), "asc")
    for batch in plan.batches:
        prompts = _prompts(batch, plan.prompt_len, vocab, seed=batch)
        for steered in (False, True):
            ivs = [asc_intervention(model, vec, 1.0)] if steered else []

            def run(n: int, prompts=prompts, ivs=ivs, batch=batch) -> None:
                cfg = GenerationConfig(max_new_tokens=n, stop_at_eos=False, batch_size=batch)
                with torch.inference_mode():
                    model.generate(prompts, cfg, ivs)

            _cell(res, clock, device, {"model": name, "runner": backend,
                                       "steered": "ASC" if steered else "no",
                                       "batch": batch}, run, plan)
    # per-thought caching
    traces = make_traces(model.tokenizer, plan.n_traces, seed=0, max_len=plan.trace_len)
    out = Path(tempfile.mkdtemp(prefix="lens_steer_cache_"))
    try:
        config = CacheConfig(batch_size=plan.cache_batch, progress=False)
        cache_thoughts(model, traces[:plan.cache_batch], out / "warm", config)
        tokens = sum(len(t["token_ids"]) for t in traces)
        done = []
        seconds = _timed(lambda: done.append(cache_thoughts(model, traces, out / "run", config)),
                         device)
        res.cache.append({"model": name, "runner": backend, "traces": len(traces),
                          "tokens": tokens, "thoughts": done[0].n_thoughts, "seconds": seconds,
                          "layers": model.n_layers})
    except Exception as err:  # noqa: BLE001 - recorded in the table
        res.cache.append({"model": name, "runner": backend, "failed": _failure(err)})
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        _free(device)
        clock.spend()
    # ASC gamma calibration (nested forward-mode AD)
    states = [p + q[: 16 * (k + 1)] for k, (p, q) in enumerate(zip(
        _prompts(plan.n_states, plan.prompt_len, vocab, 7),
        _prompts(plan.n_states, 16 * plan.n_states, vocab, 8), strict=True))]
    try:
        cal = calibrate_gamma(model, vec, states, measure=False)
        res.calib.append({"model": name, "runner": backend, "states": len(states),
                          "per_state": cal.seconds_per_state})
    except Exception as err:  # noqa: BLE001 - recorded in the table
        res.calib.append({"model": name, "runner": backend, "states": len(states),
                          "per_state": _failure(err)})
    finally:
        clock.spend()
    del model
    _free(device)


def run(quick: bool = False, device: str = "cuda", budget_s: float | None = None) -> str:
    """Run the whole GPU benchmark; returns the markdown body of the `gpu` section."""
    # Hub kernels (transformers >= 5.25 default) need a download and would replace the very
    # modules the TransformerLens bridge wraps: measure plain PyTorch modules everywhere.
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() "
                         "is False); run on a GPU machine or use --device cpu --quick")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    plan = make_plan(dev.type, quick, budget_s)
    t_start = time.perf_counter()
    n_gen = len(plan.batches) * (1 + 2 * len(BACKENDS))
    per_model = n_gen + 2 * len(BACKENDS) + 0.5 * (1 + len(BACKENDS)) + 1  # + caching, calib
    clock = Clock(deadline=t_start + plan.budget_s, units_left=per_model * len(plan.models))
    res = Results()
    for name, shape in plan.models.items():
        root = _scratch_root(2 * _n_params(shape) / 1e9)
        try:
            t0 = time.perf_counter()
            model_dir, vocab = build_model_dir(root / "model", shape, dev, dtype)
            res.setup.append({"model": name, "what": "build + save random weights",
                              "seconds": time.perf_counter() - t0})
            clock.spend()
            common = (res, clock, plan, name, model_dir)
            steps = [("HF", partial(_hf_cells, *common, dev, dtype, vocab))]
            steps += [(b, partial(_backend_cells, *common, b, dev, dtype, vocab))
                      for b in BACKENDS]
            for label, step in steps:
                try:
                    step()
                except Exception as err:  # noqa: BLE001 - e.g. loading failed; go on
                    res.setup.append({"model": name, "what": f"{label}: {_failure(err)}"})
                    _free(dev)
        finally:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    return render(res, plan, dev, dtype, time.perf_counter() - t_start)


def _fmt(x: Any, spec: str = ".1f") -> str:
    return x if isinstance(x, str) else format(x, spec)


def render(res: Results, plan: Plan, device: torch.device, dtype: torch.dtype,
           total_s: float) -> str:
    import transformers

    lines = [
        f"Device: **{device_name(device)}**; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {str(dtype).removeprefix('torch.')}. Random-weight "
        f"models of the published shapes ({', '.join(plan.models)}); prompts of "
        f"{plan.prompt_len} random tokens; greedy, EOS ignored; up to {plan.new_tokens} new "
        f"tokens per cell within a {plan.budget_s:.0f} s budget (column `tokens`: what the cell "
        f"generated). Steered: ASC gamma·v̂ (gamma 1) at `blocks.{{round(2L/3)}}.hook_resid_post` on "
        f"the newest position of every step. Total wall time {total_s:.0f} s.", "",
        "### generation throughput", "",
        "| model | runner | steered | batch | tokens | seconds | tokens/s | vs HF |",
        "|---|---|---|---|---|---|---|---|"]
    hf = {(r["model"], r["batch"]): r["tok_s"] for r in res.gen if r["runner"] == "HF generate"}
    for r in res.gen:
        ref = hf.get((r["model"], r["batch"]))
        rel = (f"{r['tok_s'] / ref:.2f}" if isinstance(ref, float) and isinstance(r["tok_s"], float)
               else "—")
        lines.append(f"| {r['model']} | {r['runner']} | {r['steered']} | {r['batch']} | "
                     f"{r['tokens']} | {_fmt(r['seconds'], '.2f')} | {_fmt(r['tok_s'])} | {rel} |")
    lines += ["", "### per-thought caching (`cache_thoughts`, all layers)", "",
              "| model | backend | traces | tokens | thoughts | seconds | tokens/s | thoughts/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res.cache:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['runner']} | | | | {r['failed']} | | |")
            continue
        lines.append(f"| {r['model']} | {r['runner']} | {r['traces']} | {r['tokens']} | "
                     f"{r['thoughts']} | {r['seconds']:.2f} | {r['tokens'] / r['seconds']:.0f} | "
                     f"{r['thoughts'] / r['seconds']:.1f} |")
    lines += ["", "### ASC gamma calibration (‖J v̂‖, ‖H v̂‖ by nested forward-mode AD)", "",
              "| model | backend | states | seconds per state |", "|---|---|---|---|"]
    for r in res.calib:
        lines.append(f"| {r['model']} | {r['runner']} | {r['states']} | "
                     f"{_fmt(r['per_state'], '.3f')} |")
    lines += ["", "Setup (not in the numbers above): " + "; ".join(
        f"{r['model']} {r['what']}" + (f" {r['seconds']:.1f} s" if "seconds" in r else "")
        for r in res.setup) + "."]
    return "\n".join(lines) + "\n"
