"""`lens-steer plan`: memory of a run before the run (weights, KV cache, captures, working set).

    lens-steer plan --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --batch 16 --max-tokens 10000 --gpu-mem 80GiB
    lens-steer plan --model Qwen/QwQ-32B --batch 8 --max-tokens 10000 --gpu-mem 80GiB --gpus 4
    lens-steer plan --model path/to/model_dir --batch 4 --max-tokens 2048 --dtype fp32

Reads only the config (a model directory, a known hub id, or a hub id in the local cache).
Exits with status 2 when the batch does not fit, printing the largest batch that does.
"""

from __future__ import annotations

import dataclasses

from experiments.config import ConfigBase, field, register_command


@dataclasses.dataclass
class PlanConfig(ConfigBase):
    """plan"""

    model: str = field()
    """Model directory, or a hub id (known: QwQ-32B, R1-Distill 1.5B/7B/8B)."""
    max_tokens: int = field(minimum=1)
    """Prompt + generated tokens per sequence."""
    batch: int = field(1, minimum=1)
    """Sequences decoded together."""
    dtype: str = field("bf16", choices=("bf16", "bfloat16", "fp16", "float16", "fp32",
                                        "float32"))
    """Planned weights dtype (large models run in bf16; `--dtype` of the studies)."""
    gpu_mem: str | None = None
    """Memory per GPU, e.g. 80GiB (default: the visible CUDA devices)."""
    gpus: int = field(1, minimum=1)
    """GPUs the device map spreads over."""
    capture_layers: int = field(0, minimum=0)
    """Layers captured per run."""
    capture_positions: int = field(0, minimum=0)
    """Positions captured per layer over the run."""
    prefill_chunk: int | None = field(None, minimum=1)
    """Prefill in chunks of this many tokens (the studies' --prefill-chunk)."""
    attention: str = field("sdpa", choices=("sdpa", "flash", "eager"))
    """Attention implementation."""
    headroom: float = field(0.1, minimum=0)
    """Fraction of device memory kept free (CUDA context, fragmentation)."""


def register(subparsers) -> None:
    register_command(subparsers, "plan", "estimate GPU memory for a model, batch and max tokens",
                     PlanConfig, run, run_folder=False)


def run(args: PlanConfig) -> int:
    from lens_steer.memory import cuda_memory_bytes, parse_bytes, plan_memory

    if args.gpu_mem is not None:
        device_memory = parse_bytes(args.gpu_mem)
    else:
        device_memory = cuda_memory_bytes()
    plan = plan_memory(args.model, dtype=args.dtype, batch_size=args.batch,
                       max_tokens=args.max_tokens, n_capture_layers=args.capture_layers,
                       n_capture_positions=args.capture_positions,
                       device_memory_bytes=device_memory, n_devices=args.gpus,
                       prefill_chunk=args.prefill_chunk,
                       attention=args.attention, headroom=args.headroom)
    print(plan)
    if plan.fits is False:
        print(f"batch {args.batch} does not fit; largest safe batch: {plan.largest_safe_batch}")
        return 2
    return 0
