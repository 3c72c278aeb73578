"""`lens-steer transfer`: a vector extracted on one dataset applied on another.

On the toy reasoner the datasets are toy problems by length (`toy:short` = 2-3 steps,
`toy:long` = 5-6 steps, `toy` = all): the transferred vector (extracted on `source`) is compared
with the in-domain vector (extracted on `target`) and the unsteered base, all on `target`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.common import TOY_VARIANTS, SteeringStudyConfig
from experiments.config import field, register_command
from experiments.pipeline import SteeringPipeline, merge_records
from experiments.run_folder import RunFolder, markdown_table
from lens_steer.errors import ConfigError
from lens_steer.io import read_jsonl

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


@dataclasses.dataclass
class TransferConfig(SteeringStudyConfig):
    source: str = field("toy:short", choices=tuple(TOY_VARIANTS))
    """Dataset the transferred vector is extracted on."""
    target: str = field("toy:long", choices=tuple(TOY_VARIANTS))
    """Dataset every condition is evaluated on (and the in-domain vector extracted on)."""


def register(sub: argparse._SubParsersAction) -> None:
    register_command(sub, "transfer", "a vector from one dataset applied on another",
                     TransferConfig, run_transfer)


def run_transfer(cfg: TransferConfig, out: Path, model: ModelBackend | None = None) -> Path:
    run = RunFolder(out)
    src = SteeringPipeline(dataclasses.replace(cfg, dataset=cfg.source),
                           RunFolder(run.path / "source"), model, eval_dataset=cfg.target)
    tgt = SteeringPipeline(dataclasses.replace(cfg, dataset=cfg.target),
                           RunFolder(run.path / "target"), src.model)
    run.write_config(cfg, "transfer")
    # every condition on the same target problems, none of them in either extraction split
    seen = {p.question for p in tgt.extract_problems}
    tgt.eval_problems = [p for p in src.eval_problems if p.question not in seen]
    if not tgt.eval_problems:
        raise ConfigError("every evaluation problem is in the target's extraction split: use "
                         "another --eval-seed or a larger --n-eval")
    base = tgt.evaluate("base")
    transferred = tgt.evaluate("transferred", [src.vector().intervention(src.model)])
    in_domain = tgt.evaluate("in-domain", [tgt.vector().intervention(tgt.model)])
    rows = [{"condition": name, "accuracy": s["accuracy"], "mean_tokens": s["mean_tokens"],
             "reflection_transition_per_trace": s["reflection_transition_per_trace"]}
            for name, s in (("base", base), (f"transferred ({cfg.source})", transferred),
                            (f"in-domain ({cfg.target})", in_domain))]
    merge_records(tgt.run, ["base", "transferred", "in-domain"])
    run.write_records(read_jsonl(tgt.run.path / "records.jsonl"))
    run.write_metrics({"method": cfg.method, "source": cfg.source, "target": cfg.target,
                       "layer": tgt.layer, "base": base, "transferred": transferred,
                       "in_domain": in_domain})
    run.save_figure(_figure(rows), "transfer.png")
    run.write_report(f"# Transfer ({cfg.method}, layer {tgt.layer}): {cfg.source} -> "
                     f"{cfg.target}\n\n![transfer](transfer.png)\n\n" + markdown_table(rows))
    return run.path


def _figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    names = [r["condition"] for r in rows]
    for ax, key in zip(axes, ("accuracy", "mean_tokens", "reflection_transition_per_trace"),
                       strict=True):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=["grey", "tab:blue", "tab:orange"])
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_title(key.replace("_", " "), fontsize=9)
    fig.tight_layout()
    return fig
