"""Looking inside continuous thoughts: logit lens over graph nodes, frontier mass, probe inputs.

    lens = latent_node_probs(model, tok, ids, examples, n_latents=6)   # one row per (problem, thought)
    summary = frontier_mass(lens)                # mean mass on frontier / other reachable / unreachable
    plot_frontier_mass(summary, "runs/coconut/x/frontier_mass.png")
    acts, labels, groups = latent_activations(model, tok, ids, examples, n_latents=6)
    # acts: {layer: Tensor[n_problems * n_latents, d]}, labels: thought index, groups: problem index

Thought t (0-based) is the post-norm last hidden state fed in as latent t's embedding. Decoding
it through the unembedding gives a next-token distribution; we read the probability it puts on
each graph node's name. The "latent BFS" reading expects thought t to weigh the nodes at
distance t + 1 from the root (its frontier) more than the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from lens_steer.coconut.curriculum import build_prompt, tokenize_example
from lens_steer.coconut.data import bfs_distances
from lens_steer.coconut.model import LatentIds, LatentRunner, continuous_forward


def _node_token_ids(tokenizer, names: list[str]) -> list[int | None]:
    out = []
    for n in names:
        t = tokenizer.encode(n, add_special_tokens=False)
        out.append(t[0] if len(t) == 1 and t[0] != tokenizer.unk_token_id else None)
    return out


@torch.no_grad()
def _run_latents(model, tokenizer, ids: LatentIds, examples, n_latents: int, batch_size: int,
                 hidden: bool):
    if isinstance(model, torch.nn.Module):
        model.eval()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [build_prompt(tokenize_example(tokenizer, e), "coconut", ids, n_latents)
                   for e in chunk]
        T = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        x = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
        m = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        out = continuous_forward(model, x, m, ids.latent, output_hidden_states=hidden)
        first = T - n_latents - 1                      # prompts end in latents + end marker
        yield i, chunk, out, first


@torch.no_grad()
def latent_node_probs(model, tokenizer, ids: LatentIds, examples, *, n_latents: int,
                      batch_size: int = 64) -> list[dict]:
    """Logit lens on each continuous thought: probability on every graph node's name.

    One row per (problem, thought): `problem`, `thought`, `node_probs` (node index -> p; nodes
    whose name is not a single token are left out), `dist` (node -> distance from root or None),
    `target`, `neg_target`, `top_tokens` (the 5 most likely tokens).
    """
    head = LatentRunner(model).head                 # HF model or ModelBackend: its own unembedding
    rows = []
    for i, chunk, out, _ in _run_latents(model, tokenizer, ids, examples, n_latents, batch_size,
                                         hidden=False):
        probs = torch.softmax(head(out.thoughts).float(), dim=-1)      # (B, k, V)
        for j, ex in enumerate(chunk):
            tids = _node_token_ids(tokenizer, ex.idx_to_symbol)
            dist = bfs_distances(ex.edges, len(ex.idx_to_symbol), ex.root)
            for t in range(n_latents):
                p = probs[j, t]
                top = p.topk(5)
                rows.append({
                    "problem": i + j, "thought": t,
                    "node_probs": {n: float(p[tid]) for n, tid in enumerate(tids) if tid is not None},
                    "dist": dist, "root": ex.root, "target": ex.target, "neg_target": ex.neg_target,
                    "top_tokens": [[tokenizer.convert_ids_to_tokens(int(a)), float(b)]
                                   for b, a in zip(top.values, top.indices, strict=True)],
                })
    return rows


def frontier_mass(lens_rows: list[dict]) -> dict:
    """Per thought t: mean probability on frontier nodes (distance t + 1), other reachable nodes,
    unreachable nodes, the root, the target and the distractor; the frontier's share of all
    graph-node mass; and how often the single most likely node is on the frontier
    (`top_is_frontier`) or reachable at all (`top_is_reachable`), the node a reader of the
    thought would decode (the paper's Figure 6 reading)."""
    by_t: dict[int, list[dict]] = {}
    for r in lens_rows:
        fr, other, unreach, root = 0.0, 0.0, 0.0, 0.0
        t = r["thought"]
        for n, p in r["node_probs"].items():
            d = r["dist"][n]
            if n == r["root"]:
                root += p
            elif d == t + 1:
                fr += p
            elif d is None:
                unreach += p
            else:
                other += p
        total = fr + other + unreach + root
        top = max(r["node_probs"], key=r["node_probs"].get) if r["node_probs"] else None
        d_top = r["dist"][top] if top is not None else None
        by_t.setdefault(t, []).append({
            "top_is_frontier": float(top is not None and top != r["root"] and d_top == t + 1),
            "top_is_reachable": float(top is not None and top != r["root"] and d_top is not None),
            "frontier": fr, "other_reachable": other, "unreachable": unreach, "root": root,
            "target": r["node_probs"].get(r["target"], 0.0),
            "neg_target": r["node_probs"].get(r["neg_target"], 0.0),
            "frontier_share": fr / total if total > 0 else 0.0,
            "has_frontier": any(d == t + 1 for d in r["dist"] if d is not None),
        })
    out = {}
    for t, vals in sorted(by_t.items()):
        keys = [k for k in vals[0] if k != "has_frontier"]
        live = [v for v in vals if v["has_frontier"]]
        out[t] = {k: sum(v[k] for v in vals) / len(vals) for k in keys}
        out[t]["n"] = len(vals)
        out[t]["n_with_frontier"] = len(live)
        out[t]["frontier_when_present"] = (sum(v["frontier"] for v in live) / len(live)
                                           if live else None)
    return out


def plot_frontier_mass(summary: dict, path: str | Path, title: str = "") -> Path:
    """Line plot of mean node mass per thought (frontier vs others), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lens_steer.io import atomic_path

    ts = sorted(int(t) for t in summary)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in [("frontier", "o-"), ("other_reachable", "s--"), ("unreachable", "^:"),
                       ("root", "x-."), ("target", "d-")]:
        ax.plot([t + 1 for t in ts], [summary[t][key] for t in ts], style, label=key)
    ax.set_xlabel("continuous thought (1-based)")
    ax.set_ylabel("mean probability (logit lens)")
    ax.set_title(title or "Logit lens of continuous thoughts on graph nodes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


LABELS = ("thought", "hops", "frontier_has_target", "target_reached")


@torch.no_grad()
def latent_activations(model, tokenizer, ids: LatentIds, examples, *, n_latents: int,
                       layers: list[int] | None = None, label: str = "thought",
                       thoughts: list[int] | None = None, batch_size: int = 64,
                       ) -> tuple[dict[int, Float[Tensor, "n d"]], list[int], list[int]]:
    """Residual-stream activations at every continuous-thought position, for `probes.probe_layers`.

    Layer l is `hidden_states[l]` (0 = embeddings, i.e. the thought itself for t >= 1; the last
    layer is post-norm). One row per (problem, thought in `thoughts`, default all). `label`:
    `thought` (its index t), `hops` (the problem's path length), `frontier_has_target` (1 when
    the target is at distance t + 1, i.e. on thought t's frontier) or `target_reached` (1 when
    a breadth-first search after t + 1 expansions has reached the target: hops <= t + 1).
    Within one thought index the last two are not confounded with t. `groups` is the problem
    index (split probes by it).
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; choose one of {LABELS}")
    keep = list(range(n_latents)) if thoughts is None else list(thoughts)
    acts: dict[int, list[Tensor]] = {}
    labels, groups = [], []
    for i, chunk, out, first in _run_latents(model, tokenizer, ids, examples, n_latents,
                                             batch_size, hidden=True):
        hs = out.hidden_states
        use = layers if layers is not None else list(range(len(hs)))
        for lyr in use:
            acts.setdefault(lyr, []).append(
                hs[lyr][:, [first + t for t in keep]].float().reshape(-1, hs[lyr].shape[-1]))
        for j, ex in enumerate(chunk):
            hops = len(ex.steps)
            for t in keep:
                groups.append(i + j)
                labels.append({"thought": t, "hops": hops,
                               "frontier_has_target": int(hops == t + 1),
                               "target_reached": int(hops <= t + 1)}[label])
    return {k: torch.cat(v) for k, v in acts.items()}, labels, groups
