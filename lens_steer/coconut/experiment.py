"""A Coconut vs CoT vs no-CoT comparison: its config, data, models, and the run folder.

    cfg = CoconutRunConfig(train=TrainConfig(val_size=100))     # official schedule by default
    metrics = run(cfg, Path("runs/coconut/x"))                  # train, evaluate, inspect, report

`CoconutRunConfig` holds the data and model choices and one `TrainConfig` shared by every
method (mode, seed and time cap set per method). The `lens-steer coconut` command
(`experiments/coconut_cmd.py`) is a thin layer over this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lens_steer.coconut.train import TrainConfig

METHODS = ("coconut", "cot", "nocot")
GENERATORS = ("official", "small")


@dataclass
class CoconutRunConfig:
    """One Coconut vs CoT vs no-CoT comparison (all methods trained from the same initialisation).

    Training itself is one `TrainConfig` (`train`, official ProsQA schedule by default), shared
    by every method; `--set train.lr=7e-4` overrides a field of it."""

    seed: int = 0
    """Seed for data generation, initialisation and shuffling."""
    train_data: str = ""
    """Official-format JSON of training problems ("" = generated with `generator`)."""
    val_data: str = ""
    """Validation problems (checkpoint selection, per-epoch accuracy); "" = generated."""
    test_data: str = ""
    """Problems scored once at the end; "" = generated."""
    n_train: int = 10000
    """Generated training problems (or the first n of `train_data`)."""
    n_val: int = 100
    """Validation problems (or the first n of `val_data`)."""
    n_test: int = 500
    """Test problems (or the first n of `test_data`)."""
    generator: str = "official"
    """`official`: graphs of the official size distribution (`data.OFFICIAL_SIZE`: ~23 nodes,
    ~36 edges, 3-6 hops); `small`: 9-11 nodes, 3-5 hops (the earlier runs)."""
    text_style: str = "prosqa"
    """`prosqa` (official sentences) or `compact` (`Every A is a B.` -> `A B .`; same graph,
    half the tokens). Data files keep the ProsQA text."""
    model: str = ""
    """A Hugging Face causal LM folder to start from (GPT-2, Qwen2, Llama, ...; its own
    tokenizer); "" = a from-scratch `arch` model with the `tokenizer` below."""
    arch: str = "qwen2"
    """From-scratch architecture: qwen2, llama or gpt2."""
    d_model: int = 128
    """Model width (from scratch)."""
    n_layers: int = 4
    """Transformer blocks (from scratch)."""
    n_heads: int = 4
    """Attention heads (from scratch)."""
    tokenizer: str = "word"
    """From scratch: `word` (one token per word over the generator's and the official names;
    `<unk>` is an error) or `bpe` (byte-level BPE trained on the training texts: covers any
    text)."""
    bpe_vocab: int = 512
    """Vocabulary size of the `bpe` tokenizer."""
    methods: tuple[str, ...] = METHODS
    """Which methods to train, in order."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(val_size=100))
    """How every method is trained (mode, seed and time budget are set per method)."""
    time_budget_s: dict = field(default_factory=dict)
    """Per-method training time cap in seconds (a missing method has none)."""
    n_inspect: int = 200
    """Test problems used for the logit lens and the probes."""
    latent_sweep: bool = False
    """Also score Coconut with 0 .. max+1 continuous thoughts at inference."""
    probe_layers: tuple[int, ...] = ()
    """Layers passed to the probes (empty = all)."""

    def __post_init__(self) -> None:
        from lens_steer.errors import ConfigError

        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        self.methods, self.probe_layers = tuple(self.methods), tuple(self.probe_layers)
        bad = [m for m in self.methods if m not in METHODS]
        checks = [
            (min(self.n_train, self.n_test) >= 1 and min(self.n_val, self.n_inspect) >= 0,
             "n_train, n_test must be >= 1; n_val, n_inspect >= 0"),
            (not bad and bool(self.methods), f"methods must be a non-empty subset of {METHODS}"),
            (self.generator in GENERATORS, f"generator must be one of {GENERATORS}"),
            (self.text_style in ("prosqa", "compact"), "text_style must be 'prosqa' or 'compact'"),
            (self.tokenizer in ("word", "bpe"), "tokenizer must be 'word' or 'bpe'"),
            (self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads"),
            (min(self.d_model, self.n_layers, self.bpe_vocab) >= 1, "sizes must be >= 1"),
            (all(k in METHODS and v > 0 for k, v in self.time_budget_s.items()),
             "time_budget_s maps method names to positive seconds"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def train_config(self, mode: str) -> TrainConfig:
        return dataclasses.replace(self.train, mode=mode, seed=self.seed,
                                   time_budget_s=float(self.time_budget_s.get(mode, 0)))

def cpu_conditions() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "loadavg": load, "platform": platform.platform()}


def make_data(cfg: CoconutRunConfig):
    """(train, val, test) problems: the given files, else generated with distinct seeds."""
    from lens_steer.coconut.data import OFFICIAL_SIZE, generate_prosqa, load_steps_json

    kw = OFFICIAL_SIZE if cfg.generator == "official" else dict(
        n_concepts=(7, 9), hops=(3, 5), extra_edge_ratio=0.5)
    out = []
    for i, (path, n) in enumerate(((cfg.train_data, cfg.n_train), (cfg.val_data, cfg.n_val),
                                   (cfg.test_data, cfg.n_test)), start=1):
        out.append(load_steps_json(path)[:n] if path else
                   generate_prosqa(n, seed=cfg.seed * 1000 + i, **kw))
    return tuple(out)


def styled(cfg_or_style, examples):
    from lens_steer.coconut.data import compact_text

    style = getattr(cfg_or_style, "text_style", cfg_or_style)
    return [compact_text(e) for e in examples] if style == "compact" else list(examples)


def fresh_model(cfg: CoconutRunConfig, train_ex, tok_dir: Path):
    """(model, tokenizer, latent ids): `cfg.model` with the markers added (copied to `tok_dir`),
    or from scratch (a `bpe` tokenizer is saved in `tok_dir`)."""
    from lens_steer.coconut.model import (
        add_latent_tokens,
        build_model,
        build_word_tokenizer,
        load_saved_model,
        prepare_model,
        train_subword_tokenizer,
        vocab_words,
    )

    if cfg.model:
        return load_saved_model(prepare_model(cfg.model, tok_dir))
    if cfg.tokenizer == "bpe":
        texts = [t for e in train_ex for t in (e.question, *e.steps, f"### {e.answer}")]
        tok = train_subword_tokenizer(texts, tok_dir, vocab_size=cfg.bpe_vocab)
    else:
        tok = build_word_tokenizer(vocab_words())
    model = build_model(tok, arch=cfg.arch, d_model=cfg.d_model, n_layers=cfg.n_layers,
                        n_heads=cfg.n_heads, seed=cfg.seed)
    ids = add_latent_tokens(model, tok)
    return model, tok, ids


def train_saved(cfg: CoconutRunConfig, mode: str, out: Path, *, init=None):
    """Train one `mode` model under `cfg` (from the saved model `init`, else fresh) and save it
    in `out` with its configs (`run_config.json`, `train_config.json`, `init.json`), result and
    per-epoch history. Returns the `TrainResult`."""
    from lens_steer.coconut.model import load_saved_model, save_model
    from lens_steer.coconut.train import train
    from lens_steer.io import write_json, write_jsonl

    out = Path(out)
    train_ex, val_ex, _ = (styled(cfg, x) for x in make_data(cfg))
    model, tok, ids = (load_saved_model(init) if init
                       else fresh_model(cfg, train_ex, out / "init"))
    tcfg = cfg.train_config(mode)
    res = train(model, tok, ids, train_ex, tcfg, val_examples=val_ex)
    save_model(model, tok, out)
    write_json(out / "run_config.json", asdict(cfg))
    write_json(out / "train_config.json", tcfg.to_dict())
    if init:
        write_json(out / "init.json", {"init": str(init)})
    write_jsonl(out / "history.jsonl", res.history)
    write_json(out / "train_result.json", {     # last: its presence marks a finished model
        "seconds": res.seconds, "optimizer_steps": res.optimizer_steps,
        "stopped_by_budget": res.stopped_by_budget, "selected_epoch": res.selected_epoch,
        "selected_val_accuracy": res.selected_val_accuracy})
    return res


def load_saved_with_data(model_dir, data, *, limit: int = 0):
    """(model, tokenizer, latent ids, its `TrainConfig`, problems): the saved model `model_dir`
    and the first `limit` problems (0 = all) of the ProsQA-format file `data`, in the text style
    the model was trained on."""
    from lens_steer.coconut.data import load_steps_json
    from lens_steer.coconut.model import load_saved_model
    from lens_steer.io import read_json

    model, tok, ids = load_saved_model(model_dir)
    tcfg = TrainConfig(**read_json(Path(model_dir) / "train_config.json"))
    rc = Path(model_dir) / "run_config.json"
    style = read_json(rc)["text_style"] if rc.exists() else "prosqa"
    return model, tok, ids, tcfg, styled(style, load_steps_json(data)[: limit or None])


def evaluate_saved(model_dir, data, *, latents: int | None = None, limit: int = 0,
                   max_new_tokens: int | None = None) -> tuple[dict, list[dict]]:
    """Score the saved model `model_dir` on the ProsQA-format file `data` (first `limit`
    problems; 0 = all) with `latents` continuous thoughts (None = its trained count), with its
    validation token budget."""
    from lens_steer.coconut.evaluate import evaluate

    model, tok, ids, tcfg, exs = load_saved_with_data(model_dir, data, limit=limit)
    k = tcfg.eval_latents if latents is None else latents
    return evaluate(model, tok, ids, exs, mode=tcfg.mode, n_latents=k,
                    max_new_tokens=max_new_tokens or tcfg.eval_max_new_tokens)


def inspect_saved(model_dir, data, out: Path, *, latents: int | None = None,
                  limit: int = 200) -> dict:
    """`inspect_thoughts` on the saved model `model_dir` and the first `limit` problems of
    `data`, with `latents` thoughts (None = its trained count); also writes `inspect.json`."""
    from lens_steer.errors import ConfigError
    from lens_steer.io import write_json

    model, tok, ids, tcfg, exs = load_saved_with_data(model_dir, data, limit=limit)
    if tcfg.mode != "coconut" and latents is None:
        raise ConfigError(f"{model_dir} is a {tcfg.mode} model (no continuous thoughts); pass a "
                          "Coconut model or a thought count (--latents K)")
    k = tcfg.eval_latents if latents is None else latents
    info = inspect_thoughts(model, tok, ids, exs, Path(out), n_latents=k)
    write_json(Path(out) / "inspect.json", {"model": str(model_dir), "data": str(data), **info})
    return info


def run(cfg: CoconutRunConfig, out: Path) -> dict:
    """Train and evaluate every method, inspect Coconut's thoughts; write the run folder."""
    import torch

    from lens_steer.coconut.data import save_prosqa, size_stats
    from lens_steer.coconut.evaluate import evaluate
    from lens_steer.coconut.model import save_model
    from lens_steer.coconut.train import train
    from lens_steer.io import write_json, write_jsonl, write_text

    t_run = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    write_json(out / "config.json", asdict(cfg))
    train_ex, val_ex, test_ex = make_data(cfg)
    for name, exs in (("train", train_ex), ("val", val_ex), ("test", test_ex)):
        save_prosqa(out / "data" / f"{name}.json", exs)
    train_ex, val_ex, test_ex = (styled(cfg, x) for x in (train_ex, val_ex, test_ex))
    metrics: dict = {"config": asdict(cfg), "conditions_start": cpu_conditions(), "methods": {},
                     "data_size": {k: size_stats(v) for k, v in
                                   (("train", train_ex), ("val", val_ex), ("test", test_ex))
                                   if v and v[0].edges}}
    records, history = [], []
    models = {}
    for mode in cfg.methods:
        model, tok, ids = fresh_model(cfg, train_ex, out / "init")
        tcfg = cfg.train_config(mode)
        res = train(model, tok, ids, train_ex, tcfg, val_examples=val_ex)
        save_model(model, tok, out / "models" / mode)
        write_json(out / "models" / mode / "train_config.json", tcfg.to_dict())
        write_json(out / "models" / mode / "run_config.json", asdict(cfg))
        t_eval = time.perf_counter()
        torch.manual_seed(cfg.seed)
        m, rec = evaluate(model, tok, ids, test_ex, mode=mode, n_latents=tcfg.eval_latents)
        m.update(train_seconds=res.seconds, optimizer_steps=res.optimizer_steps,
                 epochs_done=len(res.history), stopped_by_budget=res.stopped_by_budget,
                 selected_epoch=res.selected_epoch, selected_val_accuracy=res.selected_val_accuracy,
                 eval_seconds=time.perf_counter() - t_eval, conditions=cpu_conditions(),
                 n_params=sum(p.numel() for p in model.parameters()))
        if mode == "coconut" and cfg.latent_sweep:   # the same model with fewer / more thoughts
            t_sweep = time.perf_counter()
            m["accuracy_by_n_latents"] = {
                k: (m["accuracy"] if k == tcfg.eval_latents else
                    evaluate(model, tok, ids, test_ex, mode=mode, n_latents=k)[0]["accuracy"])
                for k in range(tcfg.eval_latents + 2)}
            m["latent_sweep_seconds"] = time.perf_counter() - t_sweep
        metrics["methods"][mode] = m
        records += rec
        history += [{"mode": mode, **h} for h in res.history]
        models[mode] = (model, tok, ids, tcfg)
        metrics["total_train_seconds"] = sum(v["train_seconds"] for v in metrics["methods"].values())
        metrics["wall_seconds"] = time.perf_counter() - t_run
        write_json(out / "metrics.json", metrics)
        write_jsonl(out / "records.jsonl", records)
        write_jsonl(out / "history.jsonl", history)
    if "coconut" in models:
        model, tok, ids, tcfg = models["coconut"]
        metrics["inspect"] = inspect_thoughts(model, tok, ids, test_ex[:cfg.n_inspect], out,
                                              n_latents=tcfg.eval_latents,
                                              probe_layers=cfg.probe_layers)
    metrics["wall_seconds"] = time.perf_counter() - t_run
    metrics["conditions_end"] = cpu_conditions()
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", report_markdown(metrics))
    return metrics


def inspect_thoughts(model, tok, ids, examples, out: Path, *, n_latents: int,
                     probe_layers=()) -> dict:
    """Look inside `n_latents` continuous thoughts on `examples`: the logit lens on graph nodes
    (`lens.jsonl`, `frontier_mass.png`), the activations (`latent_activations.safetensors`) and
    probes (`probes/`: the thought index, and "BFS has reached the target" within each thought
    index, so that label is not a proxy for the index). Returns the summary."""
    from lens_steer.coconut.inspect import (
        frontier_mass,
        latent_activations,
        latent_node_probs,
        plot_frontier_mass,
    )
    from lens_steer.io import save_tensors, write_json, write_jsonl

    k = n_latents
    info: dict = {"n_problems": len(examples), "n_latents": k}
    if k == 0 or not examples:
        return info
    lens = latent_node_probs(model, tok, ids, examples, n_latents=k)
    write_jsonl(out / "lens.jsonl", lens)
    summary = frontier_mass(lens)
    info["frontier_mass"] = summary
    plot_frontier_mass(summary, out / "frontier_mass.png",
                       title=f"Coconut logit lens, {len(examples)} test problems")
    layers = list(probe_layers) or None
    acts, labels, groups = latent_activations(model, tok, ids, examples, n_latents=k,
                                              layers=layers, label="thought")
    save_tensors(out / "latent_activations.safetensors",
                 {f"layer{lyr}": a for lyr, a in acts.items()},
                 metadata={"labels": json.dumps(labels), "groups": json.dumps(groups)})
    from probes import probe_layers

    def probe(label: str, thoughts=None) -> dict:
        acts, labels, groups = latent_activations(model, tok, ids, examples, n_latents=k,
                                                  layers=layers, label=label, thoughts=thoughts)
        if len(set(labels)) < 2:
            return {"skipped": f"one class only ({labels[0]})"}
        name = label if thoughts is None else f"{label}_t{thoughts[0]}"
        try:
            rep = probe_layers(acts, labels, groups, progress=False, tsne=False)
        except ValueError as e:                 # too few problems per class for the folds
            return {"skipped": str(e)}
        rep.save(out / "probes" / name)
        js = rep.to_json()
        js = json.loads(js) if isinstance(js, str) else js
        return {"best_layer": js.get("best_layer"), "metric": js.get("best_layer_metric"),
                "class_counts": js.get("class_counts"),
                "accuracy_by_layer": {row["layer"]: row.get("accuracy_mean")
                                      for row in js.get("layers", [])},
                "full_report": f"probes/{name}/metrics.json"}

    info["probes"] = {"thought": probe("thought")}
    for t in range(k):
        info["probes"][f"target_reached_t{t}"] = probe("target_reached", [t])
    write_json(out / "probes" / "summary.json", info["probes"])
    return info


def report_markdown(metrics: dict) -> str:
    cfg = metrics["config"]
    who = (cfg["model"] or f"{cfg['arch']} d_model={cfg['d_model']}, {cfg['n_layers']} layers, "
           f"from scratch, {cfg['tokenizer']} tokenizer")
    lines = ["# Coconut vs CoT vs no-CoT (ProsQA format)", "",
             f"Model: {who}; {cfg['n_train']} training problems, {cfg['train']['epochs']} epochs "
             f"each; test n={cfg['n_test']} ({cfg['test_data'] or 'generated'}); text style "
             f"{cfg['text_style']}.", "",
             "| method | accuracy | answers an option | generated tokens | tokens incl. latents |"
             " train time (s) | optimizer steps |", "|---|---|---|---|---|---|---|"]
    for mode, m in metrics["methods"].items():
        opt = f"{m['option_rate']:.1%}" if "option_rate" in m else "-"
        lines.append(f"| {mode} | {m['accuracy']:.1%} | {opt} | {m['mean_generated_tokens']:.1f} | "
                     f"{m['mean_tokens_incl_latents']:.1f} | {m['train_seconds']:.0f} | "
                     f"{m['optimizer_steps']} |")
    if "total_train_seconds" in metrics:
        lines += ["", f"Training {metrics['total_train_seconds']:.0f} s in all; run wall time "
                      f"{metrics.get('wall_seconds', 0):.0f} s (with evaluation and inspection)."]
    sweep = metrics["methods"].get("coconut", {}).get("accuracy_by_n_latents")
    if sweep:
        lines += ["", "Coconut accuracy with k continuous thoughts at inference: "
                  + ", ".join(f"k={k}: {a:.1%}" for k, a in sweep.items())]
    lines += ["", "Accuracy by path length (hops):", ""]
    for mode, m in metrics["methods"].items():
        lines.append(f"- {mode}: " + ", ".join(f"{h}: {a:.0%}" for h, a in
                                                m["accuracy_by_hops"].items()))
    fm = metrics.get("inspect", {}).get("frontier_mass")
    if fm:
        lines += ["", "Logit lens on continuous thoughts (mean probability):", "",
                  "| thought | frontier | other reachable | unreachable | root | target |"
                  " frontier share of node mass | top node on frontier | top node reachable |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t, s in fm.items():
            lines.append(f"| {int(t) + 1} | {s['frontier']:.3f} | {s['other_reachable']:.3f} | "
                         f"{s['unreachable']:.3f} | {s['root']:.3f} | {s['target']:.3f} | "
                         f"{s['frontier_share']:.3f} | {s['top_is_frontier']:.2f} | "
                         f"{s['top_is_reachable']:.2f} |")
    pr = metrics.get("inspect", {}).get("probes")
    if isinstance(pr, str):
        lines += ["", f"Probes: {pr}"]
    elif isinstance(pr, dict):
        lines += ["", "Probes on continuous-thought activations (grouped CV, see probes/):", ""]
        for label, rep in pr.items():
            if "skipped" in rep:
                lines.append(f"- label `{label}`: skipped ({rep['skipped']})")
                continue
            accs = ", ".join(f"L{k}: {v:.2f}" for k, v in rep["accuracy_by_layer"].items()
                             if isinstance(v, (int, float)))
            lines.append(f"- label `{label}` (classes {rep.get('class_counts')}): best layer "
                         f"{rep.get('best_layer')}; accuracy by layer {accs}")
    lines += ["", f"CPU at start: {metrics['conditions_start']}", ""]
    return "\n".join(lines)
