"""`lens-steer plan`: memory of a run before the run (weights, KV cache, captures, working set).

    lens-steer plan --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --batch 16 --max-tokens 10000 --gpu-mem 80GiB
    lens-steer plan --model Qwen/QwQ-32B --batch 8 --max-tokens 10000 --gpu-mem 80GiB --gpus 4
    lens-steer plan --model path/to/model_dir --batch 4 --max-tokens 2048 --dtype fp32

Reads only the config (a model directory, a known hub id, or a hub id in the local cache).
Exits with status 2 when the batch does not fit, printing the largest batch that does.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="estimate GPU memory for a model, batch and max tokens",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model directory, or a hub id (known: QwQ-32B, R1-Distill 1.5B/7B/8B)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--max-tokens", type=int, required=True, help="prompt + generated tokens")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32")
    p.add_argument("--gpu-mem", default=None,
                   help="memory per GPU, e.g. 80GiB (default: the visible CUDA devices)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the device map spreads over")
    p.add_argument("--capture-layers", type=int, default=0, help="layers captured per run")
    p.add_argument("--capture-positions", type=int, default=0,
                   help="positions captured per layer over the run")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prefill in chunks of this many tokens (backend option prefill_chunk)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "flash", "eager"))
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of device memory kept free (CUDA context, fragmentation)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
