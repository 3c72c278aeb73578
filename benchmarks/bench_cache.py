"""Per-thought caching: time vs a plain forward pass, peak memory vs TL `run_with_cache`.

Time: `cache_thoughts` with all layers (segmentation, forward, gather, safetensors shards) vs a
plain forward pass of the Hugging Face model over the same traces in the same batches, and vs
the backend's own plain forward (`model.logits`). Memory: each method in a fresh subprocess,
peak RSS growth (VmHWM after `clear_refs`) over the run, vs TransformerLens
`run_with_cache` on every `hook_resid_post`, gathering the thought rows batch by batch.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.timing import interleaved

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

SENTENCES = [
    "Tom starts with 3 apples.", "He buys 4 more, so 3 + 4 = 7.", "We compute 6 * 7 = 42.",
    "Wait, let me check: 3 + 4 = 7.", "That's correct.", "Alternatively, count up from 4.",
    "Another way to see it: 12 - 5 = 7.", "So the answer is 7.", "Hold on, let me verify.",
    "Then it slept.", "The cat sat on the mat.", "Think again about it.",
]
BATCH = 8


def make_traces(tokenizer, n: int, seed: int = 0, max_len: int = 500) -> list[dict]:
    """`n` synthetic reasoning traces of 120..max_len tokens, paragraphs of 1-3 sentences."""
    rng = random.Random(seed)
    traces = []
    for i in range(n):
        target = rng.randint(100, max_len - 100)
        paragraphs = ["Question: how many apples?\n<think>\nLet me think."]
        while len(tokenizer("\n\n".join(paragraphs))["input_ids"]) < target:
            paragraphs.append(" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 3))))
        text = "\n\n".join(paragraphs) + "\n\n</think>\nThe answer is 7."
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
        traces.append({"id": f"t{i}", "token_ids": ids, "correct": i % 2 == 0})
    return traces


def _batches(model: ModelBackend, traces, config):
    """The sequences and positions `cache_thoughts` forwards, in its batches (for baselines)."""
    from lens_steer.thoughts import segment_thoughts

    items = []
    for t in traces:
        th = segment_thoughts(t["token_ids"], model.tokenizer)
        if th:
            items.append((t["token_ids"], [x.position for x in th]))
    items.sort(key=lambda it: -(it[1][-1] + 1))
    return [items[i:i + config.batch_size] for i in range(0, len(items), config.batch_size)]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (real tokens count from 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _hf_forward(model: ModelBackend, batches, full: bool) -> None:
    hf = model.hf_model
    with torch.inference_mode():
        for batch in batches:
            seqs = [ids if full else ids[:pos[-1] + 1] for ids, pos in batch]
            input_ids, mask = model.pad_batch(seqs)
            hf(input_ids, attention_mask=mask, position_ids=_positions(mask))


def _backend_forward(model: ModelBackend, batches) -> None:
    for batch in batches:
        model.logits([ids for ids, _ in batch])


# -- memory: one fresh subprocess per method ---------------------------------------------------
def _rss_kb() -> tuple[int, int]:
    s = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmHWM:\s+(\d+)", s).group(1)),
            int(re.search(r"VmRSS:\s+(\d+)", s).group(1)))


def _mem_child(kind: str, model_dir: str, traces_path: str, out_dir: str) -> None:
    """Run one method once and print its peak RSS growth (KiB) as JSON."""
    torch.set_num_threads(1)
    from lens_steer import load_model
    from lens_steer.cache import CacheConfig, cache_thoughts

    model = load_model(model_dir, backend="transformer_lens", device="cpu")
    if kind.startswith("run_with_cache"):  # the raw-library baseline a user would write
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(model_dir, tokenizer=model.tokenizer,
                                                     device="cpu")
        bridge.eval()
    traces = json.loads(Path(traces_path).read_text())
    config = CacheConfig(batch_size=BATCH, progress=False)
    batches = _batches(model, traces, config)
    # warm the allocator / lazy inits on a tiny input, then measure from here
    model.capture_resid([[5, 6, 7]], list(range(model.n_layers)), [[1]])
    Path("/proc/self/clear_refs").write_text("5")
    _, before = _rss_kb()
    kept = []
    if kind == "cache":
        cache_thoughts(model, traces, out_dir, config)
    elif kind in ("run_with_cache", "run_with_cache_all"):
        with torch.inference_mode():
            for batch in batches:
                seqs = [ids[:pos[-1] + 1] for ids, pos in batch]
                input_ids, mask = model.pad_batch(seqs)
                _, cache = bridge.run_with_cache(
                    input_ids, attention_mask=mask, position_ids=_positions(mask),
                    names_filter=lambda name: name.endswith("hook_resid_post"))
                width = input_ids.shape[1]  # left padding: real position p is column width-len+p
                rows = torch.tensor([b for b, (_, pos) in enumerate(batch) for _ in pos])
                cols = torch.tensor([width - len(s) + p for s, (_, pos) in zip(seqs, batch, strict=True)
                                     for p in pos])
                if kind == "run_with_cache_all":  # the full activation cache of the dataset
                    kept.append(cache)
                else:
                    kept.append({name: act[rows, cols].clone() for name, act in cache.items()})
                del cache
    elif kind == "plain":
        _hf_forward(model, batches, full=False)
    else:
        raise ValueError(kind)
    peak, _ = _rss_kb()
    print(json.dumps({"peak_kib": peak - before}))


def _measure_memory(kind: str, model_dir: Path, traces_path: Path, out_dir: Path) -> float:
    root = Path(__file__).resolve().parent.parent
    code = (f"from benchmarks.bench_cache import _mem_child; _mem_child({kind!r}, "
            f"{str(model_dir)!r}, {str(traces_path)!r}, {str(out_dir)!r})")
    # fixed malloc thresholds: big buffers are mmapped and returned on free, so RSS tracks the
    # live tensors and VmHWM their peak
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_kib"] / 1024


def _time_backend(model: ModelBackend, traces, batches, out_root: Path, config, repeats: int
                  ) -> dict[str, float]:
    """Median seconds of caching, plain HF forward and the backend's plain forward."""
    from lens_steer.cache import cache_thoughts

    counter = iter(range(10**6))
    runs = {
        "cache": lambda: cache_thoughts(model, traces, f"{out_root}{next(counter)}", config),
        "hf_same": lambda: _hf_forward(model, batches, full=True),
        "hf_trimmed": lambda: _hf_forward(model, batches, full=False),
        "backend_plain": lambda: _backend_forward(model, batches),
    }
    times = interleaved(runs, repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def run(quick: bool = False) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: one thread per process times more stably
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        return _run(quick, tmp)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)


def _run(quick: bool, tmp: Path) -> str:
    from lens_steer import load_model
    from lens_steer.cache import CacheConfig, load_cache
    from lens_steer.testing import build_tiny_model

    d_model, n_layers, n_traces = (128, 4, 16) if quick else (256, 4, 48)
    repeats = 2 if quick else 3
    model_dir = build_tiny_model(tmp / "model", "qwen2", d_model=d_model, n_layers=n_layers,
                                 n_heads=8, n_kv_heads=4)
    # memory: a deeper model, so the per-batch activation cache is not lost in the noise
    mem_layers = 8 if quick else 16
    mem_dir = build_tiny_model(tmp / "mem_model", "qwen2", d_model=d_model,
                               n_layers=mem_layers, n_heads=8, n_kv_heads=4)
    config = CacheConfig(batch_size=BATCH, progress=False)
    rows = []
    traces = None
    for backend in ("transformer_lens", "nnsight"):
        model = load_model(model_dir, backend=backend, device="cpu")
        traces = traces or make_traces(model.tokenizer, n_traces)
        batches = _batches(model, traces, config)
        med = _time_backend(model, traces, batches, tmp / f"c_{backend}", config, repeats)
        rows.append((backend, med))
    cache = load_cache(tmp / "c_nnsight0")
    n_thoughts = len(cache)
    n_tokens = sum(len(t["token_ids"]) for t in traces)

    traces_path = tmp / "traces.json"
    traces_path.write_text(json.dumps(traces))
    mem = {kind: _measure_memory(kind, mem_dir, traces_path, tmp / f"mem_{kind}")
           for kind in ("cache", "run_with_cache", "run_with_cache_all", "plain")}

    lines = [
        f"Tiny Qwen2 (d_model {d_model}, {n_layers} layers, random weights), {n_traces} "
        f"synthetic traces ({n_tokens} tokens, {n_thoughts} thoughts), all layers, batch "
        f"{BATCH}, one torch thread, median of {repeats} interleaved runs. `cache_thoughts` includes segmentation "
        "and writing the safetensors shards; it forwards each trace only up to its last thought "
        "(causal), in batches sorted by length, and skips the unembedding. \"Plain forward\" "
        "runs the same batches over the full traces; \"same tokens\" over exactly the tokens the "
        "cache forwards, which isolates the overhead of hooks, gathering and writing.",
        "",
        "| backend | cache (s) | plain HF forward (s) | **cache / plain HF** | plain HF, same "
        "tokens (s) | cache / plain HF same tokens | backend plain forward (s) "
        "| cache / backend plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend, med in rows:
        lines.append(
            f"| {backend} | {med['cache']:.3f} | {med['hf_same']:.3f} | "
            f"**{med['cache'] / med['hf_same']:.2f}** | {med['hf_trimmed']:.3f} | "
            f"{med['cache'] / med['hf_trimmed']:.2f} | {med['backend_plain']:.3f} | "
            f"{med['cache'] / med['backend_plain']:.2f} |")
    stored = n_thoughts * mem_layers * d_model * 4 / 2**20
    full = n_tokens * mem_layers * d_model * 4 / 2**20
    lines += [
        "",
        f"Peak memory: the same traces through a {mem_layers}-layer variant (TransformerLens "
        "backend), peak RSS growth during the run, each method in a fresh process, same "
        "batches and sequences:",
        "",
        "| method | peak RSS growth (MiB) |",
        "|---|---|",
        f"| `cache_thoughts` (all layers) | {mem['cache']:.1f} |",
        f"| `run_with_cache` on all `hook_resid_post`, thought rows gathered per batch | "
        f"{mem['run_with_cache']:.1f} |",
        f"| `run_with_cache` on all `hook_resid_post`, every batch's cache kept | "
        f"{mem['run_with_cache_all']:.1f} |",
        f"| plain HF forward (reference) | {mem['plain']:.1f} |",
        "",
        f"**cache / run_with_cache peak memory: {mem['cache'] / mem['run_with_cache']:.2f}** "
        f"(per-batch gathering; {mem['cache'] / mem['run_with_cache_all']:.2f} vs keeping every "
        "cache). The plain forward's own transient buffers (eager attention scores) dominate "
        "at this size; the stored output is what scales with the dataset. "
        f"Activations kept: {stored:.2f} MiB at thought positions vs {full:.1f} MiB for every "
        f"position of every layer ({full / stored:.0f}x).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
