"""Speed and memory benchmarks; `python -m benchmarks.run [NAME ...]` updates docs/benchmarks.md."""
