"""The one writer of run folders: config, metrics, per-item records, plots, report, resume marks.

    run = RunFolder("runs/x", config)          # writes config.json (resolved config)
    if not run.done("probes"): ...; run.mark_done("probes", result)
    run.save_figure(fig, "layer_curve.png"); run.write_metrics({...}); run.write_report(md)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lens_steer.io import atomic_path, read_json, write_json, write_jsonl, write_text


class RunFolder:
    def __init__(self, path: str | Path, config: Any = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if config is not None:
            self.write_config(config)

    def write_config(self, config: Any) -> Path:
        data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        return write_json(self.path / "config.json", data)

    def write_metrics(self, metrics: dict) -> Path:
        return write_json(self.path / "metrics.json", metrics)

    def write_records(self, rows, name: str = "records.jsonl") -> Path:
        return write_jsonl(self.path / name, rows)

    def write_report(self, markdown: str) -> Path:
        return write_text(self.path / "report.md", markdown)

    def save_figure(self, fig, name: str) -> Path:
        import matplotlib.pyplot as plt

        target = self.path / name
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", dpi=120,
                        bbox_inches="tight")
        plt.close(fig)
        return target

    # -- resume -------------------------------------------------------------------------------
    def _stage_file(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self._stage_file(stage).exists()

    def mark_done(self, stage: str, result: Any = None) -> None:
        write_json(self._stage_file(stage), {"result": result})

    def result(self, stage: str) -> Any:
        return read_json(self._stage_file(stage))["result"]


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub markdown table; floats to 3 decimals."""
    if not rows:
        return "_(no rows)_\n"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, dict | list):
            return json.dumps(v)
        return str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n"
                          for r in rows)
