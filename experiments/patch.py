"""`lens-steer patch`: activation patching of the delimiter state between thought types. The
state at a delimiter that opened a reflection is patched into an execution context at its
delimiter (and the reverse), one site per layer; the layer curve says where the "a reflection
comes next" decision lives (see `lens_steer.patching`)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.ablate import own_traces
from experiments.common import StudyConfig, check_layers
from experiments.config import field, register_command
from experiments.pipeline import SteeringPipeline
from experiments.run_folder import RunFolder, fingerprint, markdown_table
from lens_steer.errors import DataError
from lens_steer.patching import delimiter_states, find_openings, patch_curve

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

SITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")
DIRECTIONS = (("reflection", "execution"), ("execution", "reflection"))
"""(source, target): reflection state into execution contexts, and the reverse."""


@dataclasses.dataclass
class PatchConfig(StudyConfig):
    """patching"""

    site: str = field("resid_post", choices=SITE_KINDS)
    """Patched site per layer: blocks.L.hook_<site> (z = blocks.L.attn.hook_z, every head)."""
    layers: list[int] | None = None
    """Layers to patch; None = every block."""
    n_traces: int = field(48, minimum=2)
    """First N extraction problems whose own traces give the delimiter states."""
    n_pairs: int = field(24, minimum=1)
    """(source, target) delimiter pairs per direction (from different traces)."""
    max_k: int = field(4, minimum=1)
    """Longest opening (tokens) that may define "the next thought is a reflection"."""
    patch_batch: int = field(32, minimum=1)
    """Sequences per patched forward (each holds length x vocabulary logits)."""


def register(sub: argparse._SubParsersAction) -> None:
    register_command(sub, "patch", "patch the delimiter state between reflection and "
                     "execution thoughts, per layer", PatchConfig, run_patch)


def patch_study(model: ModelBackend, run: RunFolder, traces: Sequence[Sequence[int]], layers: Sequence[int],
                site: str = "resid_post", n_pairs: int = 24, max_k: int = 4, seed: int = 0,
                batch_size: int = 32, identity: Any = None, prefix: str = "patch"
                ) -> dict[str, Any]:
    """Both directions' layer curves over `traces` (token ids), each a keyed stage of `run`."""
    states = delimiter_states(model, traces)
    openings = find_openings(traces, states, "reflection", max_k=max_k, decode=model.decode)
    counts = {k: sum(s.label == k for s in states) for k in ("execution", "reflection",
                                                             "transition")}
    out: dict[str, Any] = {"site": site, "n_traces": len(traces), "delimiters": counts,
                           "openings": openings.to_dict(), "curves": {}}
    key = {"model": identity, "traces": fingerprint([list(t) for t in traces]),
           "layers": list(layers), "site": site, "n_pairs": n_pairs, "max_k": max_k,
           "seed": seed}
    for source, target in DIRECTIONS:
        name = f"{source}->{target}"
        out["curves"][name] = run.cached(
            f"{prefix}-{source}-into-{target}-{site}", key,
            lambda s=source, t=target: patch_curve(model, traces, states, openings, layers,
                                                   site, n_pairs, seed, s, t, batch_size))
    return out


def run_patch(cfg: PatchConfig, out: Path, model: ModelBackend | None = None) -> Path:
    run = RunFolder(out)
    pipe = SteeringPipeline(cfg, run, model)
    run.write_config(cfg, "patch")
    m = pipe.model
    layers = (check_layers(m, cfg.layers, "--layers") if cfg.layers is not None
              else list(range(m.n_layers)))
    traces = own_traces(pipe, cfg.n_traces)
    result = patch_study(m, run, traces, layers, cfg.site, cfg.n_pairs, cfg.max_k, cfg.seed,
                         cfg.patch_batch, cfg.identity())
    run.write_metrics({"model": m.describe(), **result})
    run.save_figure(curve_figure(result), "patch_curve.png")
    run.write_report(f"# Delimiter-state patching ({cfg.model})\n\n" + report_section(result))
    return run.path


def report_section(result: dict[str, Any], figure: str = "patch_curve.png") -> str:
    op = result["openings"]
    fwd, rev = (result["curves"][f"{s}->{t}"] for s, t in DIRECTIONS)
    best = max(fwd, key=lambda r: r["delta"])
    rows = [{"layer": a["layer"], "site": a["site"],
             "P refl (exec ctx)": a["p_target_clean"], "patched ← refl": a["p_patched"],
             "Δ": a["delta"], "effect": a["effect"],
             "P refl (refl ctx)": b["p_target_clean"], "patched ← exec": b["p_patched"],
             "Δ rev": b["delta"], "effect rev": b["effect"]}
            for a, b in zip(fwd, rev, strict=True)]
    return (f"Delimiters in {result['n_traces']} of the model's own extraction traces, by the "
            f"thought they open: {result['delimiters']}. \"The next thought is a reflection\" = "
            f"the next {op['k']} token(s) spell an opening that only ever begins a reflection in "
            f"these traces ({', '.join(repr(t) for t in op['texts'])}; covers "
            f"{100 * op['coverage']:.0f}% of reflections). Each pair patches "
            f"`{result['site']}` at the delimiter of one trace into another's delimiter; "
            f"{fwd[0]['n_pairs']} pairs per direction. Effect = Δ / (P in source contexts − P in "
            f"target contexts), 1 = the patch carries the whole difference. Reflection state "
            f"into execution contexts moves P(reflection) most at layer {best['layer']}: "
            f"{best['p_target_clean']:.3f} → {best['p_patched']:.3f} (effect "
            f"{_fmt(best['effect'])}).\n\n![patching]({figure})\n\n" + markdown_table(rows))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def curve_figure(result: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for (name, rows), color in zip(result["curves"].items(), ("tab:red", "tab:blue"),
                                   strict=True):
        xs = [r["layer"] for r in rows]
        a1.errorbar(xs, [r["p_patched"] for r in rows], yerr=[r["delta_sem"] for r in rows],
                    marker="o", color=color, label=f"patched: {name}")
        a1.axhline(rows[0]["p_target_clean"], color=color, ls=":", lw=1)
        a2.plot(xs, [r["effect"] if r["effect"] is not None else float("nan") for r in rows],
                marker="o", color=color, label=name)
    a1.set_xlabel("layer")
    a1.set_ylabel("P(next thought is a reflection)")
    a1.set_title(f"patched {result['site']} (dotted: clean target)", fontsize=9)
    a2.axhline(0, color="grey", lw=0.8)
    a2.axhline(1, color="grey", lw=0.8, ls="--")
    a2.set_xlabel("layer")
    a2.set_ylabel("effect (share of the gap moved)")
    for ax in (a1, a2):
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def demo_studies(pipe: SteeringPipeline, n_problems: int = 32, n_traces: int = 48,
                 n_pairs: int = 24) -> tuple[dict[str, Any], str]:
    """The demo's ablation and patching section on its own pipeline (small sizes; every part a
    keyed stage of the demo's run folder): (metrics, markdown)."""
    from experiments.ablate import ablation_study, heatmap
    from experiments.ablate import report_section as ablation_section
    from lens_steer.ablation import ablation_conditions

    m, run = pipe.model, pipe.run
    ablation = ablation_study(pipe, pipe.eval_problems[:n_problems],
                              ablation_conditions(m.n_layers), prefix="ablate-")
    ablation.pop("names")
    run.save_figure(heatmap(ablation), "ablation_heatmap.png")
    traces, _ = pipe.extraction_traces()
    ids = [m.encode(t["text"]) for t in traces[:n_traces]]
    try:
        patching = patch_study(m, run, ids, list(range(m.n_layers)), n_pairs=n_pairs,
                               seed=pipe.cfg.seed, identity=pipe.cfg.identity())
        run.save_figure(curve_figure(patching), "patch_curve.png")
        patch_md = report_section(patching)
    except DataError as err:  # too few traces to hold both thought types
        patching, patch_md = {"skipped": str(err)}, f"Skipped: {err}\n"
    md = ("\n## 4. Which components carry the thoughts? (lens-steer ablate)\n\n"
          + ablation_section(ablation)
          + "\n## 5. Where is \"a reflection comes next\" decided? (lens-steer patch)\n\n"
          + patch_md)
    return {"ablation": ablation, "patching": patching}, md
