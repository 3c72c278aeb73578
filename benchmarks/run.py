"""Run benchmarks and write their sections of docs/benchmarks.md.

Each `benchmarks/bench_<name>.py` exposes `run(quick: bool = False) -> str`, returning a
markdown section body. Only the sections of the benchmarks run are replaced; the others stay.

    python -m benchmarks.run                # all (CPU)
    python -m benchmarks.run generation     # one
    python -m benchmarks.run --device cuda  # the GPU benchmark (benchmarks/gpu.py), ~5 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import platform
import re
from pathlib import Path

import torch

from lens_steer.io import write_text

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = ("# Benchmarks\n\nWritten by `make bench` (`python -m benchmarks.run`). Ratios are "
          "measured within one process run; absolute times are for the machine stated.\n")


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def update_section(doc: str, name: str, body: str) -> str:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc)
    return doc.rstrip() + "\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {available()})")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke check")
    parser.add_argument("--device", help="run the GPU benchmark (benchmarks/gpu.py) on this "
                        "device, e.g. cuda; writes the `gpu` section")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="GPU benchmark time budget in seconds (default 300)")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    args = parser.parse_args(argv)
    doc_path: Path = args.doc
    doc = doc_path.read_text() if doc_path.exists() else HEADER
    if args.device:
        if args.names:
            parser.error("--device runs the GPU benchmark only; give no benchmark names")
        from benchmarks import gpu

        print(f"[bench] gpu on {args.device} ...", flush=True)
        body = gpu.run(quick=args.quick, device=args.device, budget_s=args.budget_s)
        stamp = f"_Run {dt.date.today().isoformat()} on {machine()}._\n\n"
        write_text(doc_path, update_section(doc, "gpu", f"## gpu\n\n{stamp}{body}"))
        print(f"[bench] wrote {doc_path}")
        return 0
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        body = importlib.import_module(f"benchmarks.bench_{name}").run(quick=args.quick)
        stamp = f"_Run {dt.date.today().isoformat()} on {machine()}._\n\n"
        doc = update_section(doc, name, f"## {name}\n\n{stamp}{body}")
        write_text(doc_path, doc)  # after each, so a later failure keeps earlier results
    print(f"[bench] wrote {doc_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
