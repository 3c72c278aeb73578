"""Reasoning problems in the official Coconut layouts: ProsQA (graph), ProntoQA, iCoT GSM8k.

A problem is a `ProsQAExample` whose fields follow the official Coconut format:

    ex = load_prosqa("path/to/prosqa_valid.json")[0]    # official file (graph fields required)
    ex = load_prosqa(PROSQA_SAMPLE)[0]                  # a small generated sample shipped here
    ex.question, ex.steps, ex.answer          # text
    ex.idx_to_symbol, ex.edges                # graph: edge [u, v] means "u is a v"
    ex.root, ex.target, ex.neg_target         # node indices

    train = generate_prosqa(2000, seed=0)     # random DAG of made-up concepts, 3-6 hop targets
    train = generate_prosqa(2000, seed=0, **OFFICIAL_SIZE)   # the official size distribution
    size_stats(train)                         # nodes / edges / hops, to compare with real data
    bfs_layers(ex)                            # [{root}, {distance-1 nodes}, {distance-2 nodes}, ...]
    gsm = load_steps_json("gsm_valid.json")   # question / steps / answer only (GSM8k, ProntoQA)
    gsm = load_icot_txt("valid.txt")          # iCoT raw lines: `question||s1 s2 ## answer`
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROSQA_SAMPLE = Path(__file__).resolve().parent / "samples" / "prosqa_generated.json"
"""A small generated ProsQA-format sample shipped with the package (official field layout and
size distribution; not the official data, which is not redistributed here). The real splits
are in facebookresearch/coconut `data/prosqa_*.json`; pass their path to `load_prosqa`."""

PEOPLE = ["Tom", "Alex", "Davis", "Sally", "Max", "Rex", "Jack", "Sam", "Polly", "Fae", "Wren",
          "Stella", "Bob", "Jane", "Carol", "Eva", "Gabriel", "Oliver"]
"""Names the generator uses for people (graph roots); a superset of the official ProsQA names."""
CONCEPTS = [s + "pus" for s in (
    "wum yim zum rem tum brim lem scrom shum ter fom ror ger lor yer boom tim dum gor jom ker lum "
    "num ster vum zhor gwom bom quim sel frum glim hum kem ler mim ner por quor rim skem "
    "tor vor wer yor zem blum crom drom flim grom jel im wor yum stor chor fel hil rom grim").split()]
"""Made-up concept names ("wumpus", "yimpus", ...): one word-level token each; a superset of the
official ProsQA concept names, so a word-level tokenizer over these covers the real splits."""
OFFICIAL_SIZE = {"n_concepts": (15, 26), "hops": (3, 6), "hop_weights": (0.41, 0.44, 0.12, 0.03),
                 "extra_edge_ratio": 0.8}
"""`generate_prosqa` options that match the official ProsQA size distribution (real validation
split: 22.8 nodes, 36.3 edges, 3/4/5/6 hops 41/44/12/2%); `size_stats` reports both."""
ADJECTIVES = ["fruity", "floral", "spicy", "bitter", "sweet", "sour", "hot", "cold", "red",
              "blue", "small", "large", "dull", "bright", "wooden", "metallic"]
"""Properties for ProntoQA-style problems."""


@dataclass
class ProsQAExample:
    """One ProsQA problem in the official field layout."""

    question: str
    """Graph statements followed by `Is <root> a <x> or <y>?`."""
    steps: list[str]
    """The reasoning chain: one sentence per edge of a shortest root-to-target path."""
    answer: str
    """`<root> is a <target>.`"""
    idx_to_symbol: list[str] = field(default_factory=list)
    """Node names; node i is `idx_to_symbol[i]` (empty for problems without a graph: GSM8k)."""
    edges: list[list[int]] = field(default_factory=list)
    """`[u, v]`: every u is a v (u a person: u is a v)."""
    root: int = -1
    """The person the question is about (-1: no graph)."""
    target: int = -1
    """The option reachable from root."""
    neg_target: int = -1
    """The distractor option, not reachable from root."""
    meta: dict = field(default_factory=dict)
    """Extra fields (e.g. `kind`, `hops`); not part of the official format."""

    def to_dict(self) -> dict:
        return asdict(self)


GRAPH_KEYS = ("idx_to_symbol", "edges", "root", "target", "neg_target")


def load_prosqa(path: str | os.PathLike = PROSQA_SAMPLE) -> list[ProsQAExample]:
    """Read a ProsQA-format JSON list (official files or `save_prosqa` output); graph required."""
    return _load_json(path, ("question", "steps", "answer", *GRAPH_KEYS))


def load_steps_json(path: str | os.PathLike) -> list[ProsQAExample]:
    """Read the official generic layout (`question`, `steps`, `answer`; e.g. GSM8k or ProntoQA
    after the official preprocessing); graph fields are kept when present."""
    return _load_json(path, ("question", "steps", "answer"))


def _load_json(path: str | os.PathLike, required: tuple[str, ...]) -> list[ProsQAExample]:
    from lens_steer.errors import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"no data file at {path}: pass the path of a JSON list of problems")
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, r in enumerate(rows):
        missing = [k for k in required if k not in r]
        if missing:
            raise DataError(f"{path}: item {i} lacks fields {missing}")
        if not isinstance(r["steps"], list):
            raise DataError(f"{path}: item {i}: `steps` must be a list of strings")
        keep = ("question", "steps", "answer", *GRAPH_KEYS)
        out.append(ProsQAExample(**{k: r[k] for k in keep if k in r}, meta=r.get("meta", {})))
    return out


def load_icot_txt(path: str | os.PathLike) -> list[ProsQAExample]:
    """iCoT-augmented GSM8k lines `question||step1 step2 ... ## answer` (the format of
    Internalize_CoT_Step_by_Step's data/gsm8k/*.txt; each space-separated `<<...>>` equation
    is one step, as in the official preprocessing)."""
    from lens_steer.errors import DataError

    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        if "||" not in line or "##" not in line:
            raise DataError(f"{path}:{i + 1}: expected `question||steps ## answer`")
        q, rest = line.split("||", 1)
        steps = rest.split("##")[0].strip().split()
        out.append(ProsQAExample(question=q, steps=steps, answer=line.split("##")[-1].strip(),
                                 meta={"kind": "gsm8k-icot"}))
    return out


def size_stats(examples: list[ProsQAExample]) -> dict:
    """Mean / min / max nodes and edges and the hop-count distribution (fractions)."""
    import statistics

    nodes = [len(e.idx_to_symbol) for e in examples]
    edges = [len(e.edges) for e in examples]
    hops: dict[int, int] = {}
    for e in examples:
        hops[len(e.steps)] = hops.get(len(e.steps), 0) + 1
    return {"n": len(examples),
            "nodes": {"mean": statistics.mean(nodes), "min": min(nodes), "max": max(nodes)},
            "edges": {"mean": statistics.mean(edges), "min": min(edges), "max": max(edges)},
            "hops": {h: c / len(examples) for h, c in sorted(hops.items())}}


def save_prosqa(path: str | os.PathLike, examples: list[ProsQAExample]) -> Path:
    from lens_steer.io import write_json

    return write_json(path, [e.to_dict() for e in examples])


def children(edges: list[list[int]], n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        out[u].append(v)
    return out


def bfs_distances(edges: list[list[int]], n: int, root: int) -> list[int | None]:
    """Shortest number of edges from root to each node (None: unreachable)."""
    ch, dist = children(edges, n), [None] * n
    dist[root] = 0
    q = deque([root])
    while q:
        u = q.popleft()
        for v in ch[u]:
            if dist[v] is None:
                dist[v] = dist[u] + 1
                q.append(v)
    return dist


def bfs_layers(ex: ProsQAExample) -> list[set[int]]:
    """Nodes by shortest distance from the root: layer t = nodes exactly t edges away.

    Layer t + 1 is the *frontier* a breadth-first search reaches at its (t+1)-th expansion,
    the set the paper's "latent BFS" reading expects continuous thought t (0-based) to weigh.
    """
    dist = bfs_distances(ex.edges, len(ex.idx_to_symbol), ex.root)
    depth = max(d for d in dist if d is not None)
    return [{i for i, d in enumerate(dist) if d == t} for t in range(depth + 1)]


def shortest_path(edges: list[list[int]], n: int, src: int, dst: int) -> list[int] | None:
    ch, prev = children(edges, n), {src: None}
    q = deque([src])
    while q:
        u = q.popleft()
        if u == dst:
            path = [u]
            while prev[path[-1]] is not None:
                path.append(prev[path[-1]])
            return path[::-1]
        for v in ch[u]:
            if v not in prev:
                prev[v] = u
                q.append(v)
    return None


def _sentence(names: list[str], u: int, v: int, people: set[int]) -> str:
    return f"{names[u]} is a {names[v]}." if u in people else f"Every {names[u]} is a {names[v]}."


def generate_prosqa(n: int, seed: int = 0, *, n_concepts: tuple[int, int] = (10, 14),
                    hops: tuple[int, int] = (3, 6), extra_edge_ratio: float = 0.6,
                    balance_parents: bool = True,
                    hop_weights: tuple[float, ...] | None = None) -> list[ProsQAExample]:
    """ProsQA-style problems: a random DAG of made-up concepts and two people.

    The root person reaches `target` by a shortest path of `hops` edges (the first edge is
    `<root> is a <concept>`); a second person reaches the distractor `neg_target` by a path of
    similar length through concepts the root cannot reach (edges go from that side into the
    root's side, never back). Extra random edges are added only if they keep the target's
    shortest distance and the distractor unreachable. As in ProsQA, both options are leaves
    (no outgoing edges), so "the option with fewer children" is no shortcut. With
    `balance_parents`, problems are rejected so that the target has more parents than the
    distractor exactly as often as fewer (otherwise "pick the option with more parents" scores
    about 59%). Statements are shuffled. `hop_weights` (one per hop count in `hops`) skews the
    hop distribution (uniform by default); `OFFICIAL_SIZE` holds the official-like settings.
    """
    if hop_weights is not None and len(hop_weights) != hops[1] - hops[0] + 1:
        raise ValueError(f"hop_weights needs one weight per hop count {hops[0]}..{hops[1]}")
    rng = random.Random(seed)
    out = []
    more = {1: 0, -1: 0}               # problems where the target has more / fewer parents
    while len(out) < n:
        ex = _one_prosqa(rng, n_concepts, hops, extra_edge_ratio, hop_weights)
        if ex is None:
            continue
        if balance_parents:
            d = _n_parents(ex, ex.target) - _n_parents(ex, ex.neg_target)
            sign = (d > 0) - (d < 0)
            if sign and more[sign] > more[-sign]:
                continue
            if sign:
                more[sign] += 1
        out.append(ex)
    return out


def _n_parents(ex: ProsQAExample, node: int) -> int:
    return sum(1 for _, v in ex.edges if v == node)


def _one_prosqa(rng: random.Random, n_concepts: tuple[int, int], hops: tuple[int, int],
                extra_edge_ratio: float, hop_weights=None) -> ProsQAExample | None:
    k = rng.randint(*n_concepts)
    hop = (rng.choices(range(hops[0], hops[1] + 1), weights=hop_weights)[0] if hop_weights
           else rng.randint(*hops))
    hop_neg = rng.randint(max(hops[0], 2), hops[1])
    if hop + hop_neg - 1 > k:
        return None
    names = rng.sample(PEOPLE, 2) + rng.sample(CONCEPTS, k)
    root, other = 0, 1
    concepts = list(range(2, 2 + k))
    rng.shuffle(concepts)
    pos_path = [root] + concepts[:hop]                       # hop edges
    neg_path = [other] + concepts[hop:hop + hop_neg - 1]     # hop_neg - 1 edges, then to neg
    rest = concepts[hop + hop_neg - 1:]
    neg_target = neg_path[-1] if len(neg_path) > 1 else None
    if neg_target is None:
        return None
    # remaining concepts: split between the root's side (A) and the distractor's side (B)
    side_a = set(pos_path[1:]) | set(c for c in rest if rng.random() < 0.5)
    side_b = set(neg_path[1:]) | (set(rest) - side_a)
    edges = [[pos_path[i], pos_path[i + 1]] for i in range(hop)]
    edges += [[neg_path[i], neg_path[i + 1]] for i in range(len(neg_path) - 1)]
    n_nodes = 2 + k
    # hang unattached A-side nodes under some reachable node, B-side ones under B or the other person
    for c in rest:
        if c in side_a:
            parents = [u for u in [root, *pos_path[1:-1]]]
            edges.append([rng.choice(parents), c])
        else:
            edges.append([rng.choice([other, *neg_path[1:-1]]), c])
    target = pos_path[-1]
    n_extra = int(extra_edge_ratio * len(edges))
    a_nodes = [root, *sorted(side_a)]
    b_nodes = [other, *sorted(side_b)]
    tries = 0
    while n_extra > 0 and tries < 200:
        tries += 1
        if rng.random() < 0.6:
            u, v = rng.choice(a_nodes), rng.choice(sorted(side_a))
        else:
            u, v = rng.choice(b_nodes), rng.choice(sorted(side_a | side_b))
        if u == v or [u, v] in edges or v in (root, other) or u in (target, neg_target):
            continue                                        # both options stay leaves
        cand = edges + [[u, v]]
        if shortest_path(cand, n_nodes, v, u) is not None:          # keep it acyclic
            continue
        dist = bfs_distances(cand, n_nodes, root)
        if dist[target] != hop or dist[neg_target] is not None:
            continue
        if u in (root, other) and sum(1 for e in cand if e[0] == u) > 3:
            continue
        edges = cand
        n_extra -= 1
    path = shortest_path(edges, n_nodes, root, target)
    assert path is not None and len(path) - 1 == hop
    steps = [_sentence(names, path[i], path[i + 1], {root, other}) for i in range(hop)]
    people = {root, other}
    statements = [_sentence(names, u, v, people) for u, v in edges]
    order = list(range(len(edges)))
    rng.shuffle(order)
    edges = [edges[i] for i in order]
    statements = [statements[i] for i in order]
    opts = [names[target], names[neg_target]]
    rng.shuffle(opts)
    question = " ".join(statements) + f" Is {names[root]} a {opts[0]} or {opts[1]}?"
    return ProsQAExample(question=question, steps=steps, answer=f"{names[root]} is a {names[target]}.",
                         idx_to_symbol=names, edges=edges, root=root, target=target,
                         neg_target=neg_target, meta={"kind": "prosqa-style", "hops": hop})


def generate_prontoqa(n: int, seed: int = 0, *, hops: int = 5, n_distractors: int = 4,
                      ) -> list[ProsQAExample]:
    """ProntoQA-style `hops`-hop problems: `Alex is a c1. Every c1 is a c2. ... Every c_h is ADJ.`

    The question is `True or false: <person> is [not] <adj>.` The chain's last concept is
    `<adj>` or `not <adj>` (encoded as the target node `adj` / `not-adj`); distractor rules mention
    the opposite property on concepts off the chain. Stored in the ProsQA layout: `target` is
    the property node the chain reaches, `neg_target` its opposite; `answer` is `True.`/`False.`
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        person = rng.choice(PEOPLE)
        adj = rng.choice(ADJECTIVES)
        cs = rng.sample(CONCEPTS, hops + n_distractors)
        chain, distract = cs[:hops], cs[hops:]
        names = [person, *cs, adj, f"not {adj}"]
        p_idx, adj_idx, nadj_idx = 0, len(names) - 2, len(names) - 1
        idx = {c: i + 1 for i, c in enumerate(cs)}
        chain_neg = rng.random() < 0.5               # does the chain end in "not adj"?
        edges = [[p_idx, idx[chain[0]]]] + [[idx[a], idx[b]] for a, b in zip(chain, chain[1:], strict=False)]
        edges.append([idx[chain[-1]], nadj_idx if chain_neg else adj_idx])
        statements = [f"{person} is a {chain[0]}."]
        statements += [f"Every {a} is a {b}." for a, b in zip(chain, chain[1:], strict=False)]
        last = f"Every {chain[-1]} is {'not ' if chain_neg else ''}{adj}."
        statements.append(last)
        steps = list(statements)
        for d in distract:                           # off-chain rules with the opposite property
            parent = rng.choice(chain[:-1])
            edges.append([idx[parent], idx[d]])
            statements.append(f"Every {parent} is a {d}.")
            edges.append([idx[d], adj_idx if chain_neg else nadj_idx])
            statements.append(f"Every {d} is {'' if chain_neg else 'not '}{adj}.")
        order = list(range(len(statements)))
        rng.shuffle(order)
        ask_neg = rng.random() < 0.5
        truth = ask_neg == chain_neg
        question = (" ".join(statements[i] for i in order)
                    + f" True or false: {person} is {'not ' if ask_neg else ''}{adj}.")
        target = nadj_idx if chain_neg else adj_idx
        out.append(ProsQAExample(
            question=question, steps=steps, answer="True." if truth else "False.",
            idx_to_symbol=names, edges=edges, root=p_idx, target=target,
            neg_target=adj_idx if chain_neg else nadj_idx,
            meta={"kind": "prontoqa-style", "hops": hops}))
    return out


def compact_text(ex: ProsQAExample) -> ProsQAExample:
    """The same problem with filler words dropped: `Every A is a B.` -> `A B .`, `P is a B.` ->
    `P B .` (question statements, steps and answer; the final question is kept).

    Halves sequence length and makes "follow an edge" a one-token-ahead copy, which a tiny
    from-scratch model learns much sooner; the graph and the reasoning are unchanged.
    """
    import re

    def conv(s: str) -> str:
        s = re.sub(r"\bEvery (\w+) is (a |not )?(\w+)\.",
                   lambda m: f"{m[1]} {'not ' if m[2] == 'not ' else ''}{m[3]} .", s)
        return re.sub(r"(?<!Is )\b([A-Z]\w*) is (a |not )?(\w+)\.",
                      lambda m: f"{m[1]} {'not ' if m[2] == 'not ' else ''}{m[3]} .", s)

    body, sep, tail = ex.question.rpartition(". ")
    question = conv(body + ".") + " " + tail if sep else conv(ex.question)
    return ProsQAExample(question=question, steps=[conv(s) for s in ex.steps],
                         answer=conv(ex.answer), idx_to_symbol=ex.idx_to_symbol, edges=ex.edges,
                         root=ex.root, target=ex.target, neg_target=ex.neg_target,
                         meta={**ex.meta, "text": "compact"})
