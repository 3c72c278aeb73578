"""Probe plots (matplotlib, Agg): the layer curve with its controls, 2-D PCA / t-SNE maps per
chosen layer coloured by label, per-layer confusion matrices; and the markdown report."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lens_steer.io import atomic_path  # noqa: E402

COLOURS = {"execution": "tab:blue", "reflection": "tab:orange", "transition": "tab:green"}


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _nan(v):
    return float("nan") if v is None else v


def plot_layer_curve(report, path: str | Path) -> Path:
    """Main-task accuracy / balanced accuracy / macro-F1 vs layer (±1 std over folds) with the
    shuffled-label control, majority baseline and model control; pairs and separability below."""
    rows = report.layers
    xs = [r["layer"] for r in rows]
    has_pairs = any(r.get("pairs") for r in rows)
    n_panels = 3 if has_pairs else 2
    fig, axes = plt.subplots(n_panels, 1, figsize=(8, 3.2 * n_panels), sharex=True)
    ax = axes[0]
    for metric, colour in (("accuracy", "tab:blue"), ("balanced_accuracy", "tab:purple"),
                           ("macro_f1", "tab:cyan")):
        m = np.array([_nan(r[f"{metric}_mean"]) for r in rows])
        s = np.array([_nan(r[f"{metric}_std"]) for r in rows])
        ax.plot(xs, m, "o-", color=colour, label=metric.replace("_", " "), ms=3)
        ax.fill_between(xs, m - s, m + s, color=colour, alpha=0.15)
    if "control_accuracy_mean" in rows[0]:
        ax.plot(xs, [_nan(r["control_accuracy_mean"]) for r in rows], "--", color="grey",
                label="control accuracy (shuffled labels)")
    ax.plot(xs, [_nan(r["majority_accuracy_mean"]) for r in rows], ":", color="black",
            label="majority-class accuracy")
    if "model_control_accuracy_mean" in rows[0]:
        ax.plot(xs, [_nan(r.get("model_control_accuracy_mean")) for r in rows], "s--",
                color="tab:red", ms=3, label="control model accuracy")
    ax.axvline(report.best_layer, color="tab:green", lw=0.8, alpha=0.6)
    ax.set_ylabel("score (test folds)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Linear probe, {'/'.join(report.classes)} "
                 f"({report.n_thoughts} thoughts, {report.config['n_folds']}-fold grouped CV); "
                 f"best layer {report.best_layer}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    i = 1
    if has_pairs:
        ax = axes[i]
        i += 1
        names = sorted({p for r in rows for p in r.get("pairs", {})})
        for name in names:
            m = [_nan(r.get("pairs", {}).get(name, {}).get("balanced_accuracy_mean")) for r in rows]
            c = [_nan(r.get("pairs", {}).get(name, {}).get("control_balanced_accuracy_mean"))
                 for r in rows]
            line, = ax.plot(xs, m, "o-", ms=3, label=name.replace("_", " "))
            ax.plot(xs, c, "--", color=line.get_color(), alpha=0.5)
        ax.axhline(0.5, color="black", lw=0.6, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("pair balanced acc.\n(dashed: control)")
        ax.legend(fontsize=7)
    ax = axes[i]
    if "fisher_ratio" in rows[0]:
        ax.plot(xs, [_nan(r["fisher_ratio"]) for r in rows], "o-", ms=3, color="tab:brown",
                label="Fisher ratio tr(Sb)/tr(Sw)")
        ax.set_ylabel("Fisher ratio")
        if any(r.get("seal_vector_norm") is not None for r in rows):
            ax2 = ax.twinx()
            ax2.plot(xs, [_nan(r.get("seal_vector_norm")) for r in rows], "s--", ms=3,
                     color="tab:olive", label="SEAL vector norm")
            ax2.set_ylabel("||mean(exec) - mean(refl+trans)||", fontsize=7)
            ax2.legend(fontsize=7, loc="upper right")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("layer")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_map(emb: dict, kind: str, layer: int, path: str | Path) -> Path:
    """Scatter of a 2-D map (`kind` = "pca" or "tsne") coloured by label."""
    xy = np.asarray(emb[kind])
    labels = np.array(emb["labels"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, lab in enumerate(sorted(set(labels))):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, label=f"{lab} ({sel.sum()})",
                   color=COLOURS.get(lab, f"C{i}"))
    title = f"layer {layer}: {kind.upper()} of standardised activations"
    if kind == "pca" and emb.get("explained_variance"):
        ev = emb["explained_variance"]
        ax.set_xlabel(f"PC1 ({ev[0]:.1%})")
        ax.set_ylabel(f"PC2 ({ev[1]:.1%})" if len(ev) > 1 else "PC2")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_confusions(report, path: str | Path) -> Path:
    """One row-normalised confusion matrix (summed over test folds) per layer, main task."""
    rows = report.layers
    n = len(rows)
    cols = min(n, 7)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 1.9 * nrows + 0.4), squeeze=False)
    labels = rows[0]["confusion_labels"]
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows, strict=False):
        cm = np.asarray(r["confusion_matrix"], dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.axis("on")
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for (i, j), v in np.ndenumerate(norm):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v > 0.6 else "black")
        ax.set_title(f"layer {r['layer']}", fontsize=8)
        ax.set_xticks(range(len(labels)), [s[:4] for s in labels], fontsize=6)
        ax.set_yticks(range(len(labels)), [s[:4] for s in labels], fontsize=6)
    fig.suptitle("Confusion matrices (rows: true, columns: predicted; row-normalised)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))


def save_plots(report, out_dir: str | Path) -> dict[str, str]:
    """Write all plots of `report` into `out_dir`; returns {name: file name}."""
    out = Path(out_dir)
    images = {"layer_curve": plot_layer_curve(report, out / "layer_curve.png").name,
              "confusion": plot_confusions(report, out / "confusion_matrices.png").name}
    for layer, emb in sorted(report.maps.items()):
        images[f"pca_{layer}"] = plot_map(emb, "pca", layer, out / f"pca_layer{layer}.png").name
        if emb.get("tsne") is not None:
            images[f"tsne_{layer}"] = plot_map(emb, "tsne", layer,
                                               out / f"tsne_layer{layer}.png").name
    return images


def _f(v, digits=3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def render_report_md(report, images: dict[str, str]) -> str:
    """report.md: summary, the layer curve (relative link), per-layer table, maps, warnings."""
    best = report.layer(report.best_layer)
    lines = [
        "# Linear probes per layer",
        "",
        f"{report.n_thoughts} thoughts from {report.n_groups} traces; classes "
        + ", ".join(f"{c} ({report.class_counts[c]})" for c in report.classes)
        + f". {report.config['n_folds']}-fold CV grouped by trace, standardised features, "
        f"logistic regression (C={report.config['C']}, balanced class weights, backend "
        f"`{report.config['backend']}`). Control: {report.config['control']}.",
        "",
        f"**Best layer: {report.best_layer}** ({report.best_layer_metric.replace('_mean', '')} "
        f"{_f(best[report.best_layer_metric])}; accuracy {_f(best['accuracy_mean'])} ± "
        f"{_f(best['accuracy_std'])}, control {_f(best.get('control_accuracy_mean'))}, "
        f"majority {_f(best['majority_accuracy_mean'])}, chance {_f(best['chance'])}).",
        "",
    ]
    if "layer_curve" in images:
        lines += [f"![layer curve]({images['layer_curve']})", ""]
    has_model = "model_control_accuracy_mean" in best
    head = ["layer", "acc", "±", "bal. acc", "macro-F1", "AUROC", "control acc", "selectivity",
            "majority"] + (["model ctrl acc"] if has_model else []) + ["Fisher", "silhouette",
                                                                       "SEAL ‖v‖"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.layers:
        cells = [str(r["layer"]), _f(r["accuracy_mean"]), _f(r["accuracy_std"]),
                 _f(r["balanced_accuracy_mean"]), _f(r["macro_f1_mean"]), _f(r["auroc_mean"]),
                 _f(r.get("control_accuracy_mean")), _f(r.get("selectivity")),
                 _f(r["majority_accuracy_mean"])]
        if has_model:
            cells.append(_f(r.get("model_control_accuracy_mean")))
        cells += [_f(r.get("fisher_ratio"), 4), _f(r.get("silhouette")),
                  _f(r.get("seal_vector_norm"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if best.get("pairs"):
        lines += ["", f"## Pairs at layer {report.best_layer}", "",
                  "| pair | acc | bal. acc | AUROC | control bal. acc |", "|---|---|---|---|---|"]
        for name, p in best["pairs"].items():
            lines.append(f"| {name} | {_f(p['accuracy_mean'])} | "
                         f"{_f(p['balanced_accuracy_mean'])} | {_f(p['auroc_mean'])} | "
                         f"{_f(p.get('control_balanced_accuracy_mean'))} |")
    maps = [k for k in images if k.startswith(("pca_", "tsne_"))]
    if maps or "confusion" in images:
        lines += ["", "## Maps and confusion matrices", ""]
        lines += [f"![{k}]({images[k]})" for k in maps]
        if "confusion" in images:
            lines.append(f"![confusion matrices]({images['confusion']})")
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    lines += ["", "Numbers: `metrics.json`."]
    return "\n".join(lines) + "\n"
