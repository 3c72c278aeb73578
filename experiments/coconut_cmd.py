"""`lens-steer coconut`: continuous thoughts (Coconut) vs CoT vs no-CoT on ProsQA-style problems.

    lens-steer coconut run --out runs/coconut/main6                # whole comparison + run folder
    lens-steer coconut run --out runs/coconut/quick --set n_train=200 --set epochs=3 --set stage0_epochs=1
    lens-steer coconut run --config runs/coconut/main6/config.json --out runs/coconut/again
    lens-steer coconut train --mode cot --out runs/coconut/cot     # one model
    lens-steer coconut train --mode coconut --init runs/coconut/cot --set stage0_epochs=0 \
        --out runs/coconut/from_cot                                 # latent stages on a CoT model
    lens-steer coconut eval --model runs/coconut/main/models/coconut --data test.json

The run folder holds config.json (resolved), data/*.json, models/<mode>/, metrics.json,
records.jsonl (one row per test problem and method), history.jsonl, lens.jsonl,
frontier_mass.png, probes/ (when the `probes` package provides `probe_layers`) and report.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

METHODS = ("coconut", "cot", "nocot")


@dataclass
class CoconutRunConfig:
    """One Coconut vs CoT vs no-CoT comparison (all three trained from the same initialisation)."""

    seed: int = 0
    """Seed for data generation, initialisation and shuffling."""
    n_train: int = 10000
    """Generated training problems (distinct; more problems and fewer epochs than the paper's
    17,886 x 50, so the small model cannot memorise them)."""
    n_val: int = 100
    """Validation problems (per-stage accuracy during training)."""
    n_test: int = 500
    """Test problems (final accuracy and token counts)."""
    n_concepts: tuple[int, int] = (7, 9)
    """Concepts per problem (inclusive range); two people are added as graph roots."""
    hops: tuple[int, int] = (3, 5)
    """Shortest root-to-target path length (inclusive range)."""
    extra_edge_ratio: float = 0.5
    """Extra random edges, as a fraction of the tree edges."""
    text_style: str = "compact"
    """`prosqa` (official sentences) or `compact` (`Every A is a B.` -> `A B .`; same graph,
    half the tokens: a tiny from-scratch model learns it far sooner). Data files keep ProsQA text."""
    d_model: int = 128
    """Model width (Qwen2 architecture, from scratch)."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    methods: tuple[str, ...] = METHODS
    """Which methods to train, in order."""
    epochs: int = 10
    """Epochs for every method (the shared budget, in passes over the same data)."""
    epochs_per_stage: int = 1
    """Coconut: epochs per curriculum stage."""
    stage0_epochs: int | None = 6
    """Coconut: epochs at stage 0 (plain CoT) before the first latent stage (None =
    epochs_per_stage)."""
    max_latent_stage: int = 3
    """Coconut: last stage adding latents (inference uses max_latent_stage * c latents)."""
    c: int = 1
    """Coconut: continuous thoughts per reasoning step."""
    pad_latent_to_max: bool = True
    """Coconut: always stage * c latents, even for problems with fewer steps."""
    reset_optimizer: bool = True
    """Coconut: reset the optimizer at each stage change."""
    lr: float = 7e-4
    """AdamW learning rate (2e-3 with batch 16 never learns the in-context edge lookup)."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    bf16: bool = True
    """bf16 autocast for training."""
    num_threads: int = 2
    """torch threads (1 while other jobs share the CPU, 2 when it is free)."""
    question_loss_weight: float = 0.5
    """Auxiliary next-token loss on the question tokens, same for every method (0 = off, the
    paper's setup); see `TrainConfig.question_loss_weight`. Without it the from-scratch models
    often answer a concept that is not one of the two options."""
    time_budget_s: dict = field(default_factory=lambda: {"coconut": 660, "cot": 660,
                                                          "nocot": 480})
    """Per-method training time cap in seconds (the default sums to the 30-minute budget;
    the documented run stayed below it); a missing method has none."""
    val_every_stage: int = 100
    """Validation problems scored at each stage end (0 = off)."""
    n_inspect: int = 200
    """Test problems used for the logit lens and the probes."""
    probe_layers: tuple[int, ...] = ()
    """Layers passed to the probes (empty = all)."""

    def __post_init__(self) -> None:
        self.n_concepts, self.hops = tuple(self.n_concepts), tuple(self.hops)
        self.methods, self.probe_layers = tuple(self.methods), tuple(self.probe_layers)
        if min(self.n_train, self.n_test) < 1 or self.n_val < 0 or self.n_inspect < 0:
            raise ValueError("n_train, n_test must be >= 1; n_val, n_inspect >= 0")
        if not (2 <= self.hops[0] <= self.hops[1]) or self.n_concepts[0] > self.n_concepts[1]:
            raise ValueError("need 2 <= hops[0] <= hops[1] and a valid n_concepts range")
        if self.n_concepts[0] < self.hops[1] + 2:
            raise ValueError("n_concepts[0] must be >= hops[1] + 2 (room for both paths)")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {bad}")
        if self.text_style not in ("prosqa", "compact"):
            raise ValueError("text_style must be 'prosqa' or 'compact'")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        if any(k not in METHODS or v <= 0 for k, v in self.time_budget_s.items()):
            raise ValueError("time_budget_s maps method names to positive seconds")
        for name in ("epochs", "epochs_per_stage", "c", "batch_size", "d_model", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.stage0_epochs is not None and self.stage0_epochs < 0:
            raise ValueError("stage0_epochs must be >= 0 (or null)")
        if self.num_threads < 0 or self.question_loss_weight < 0:
            raise ValueError("num_threads and question_loss_weight must be >= 0")

    def train_config(self, mode: str):
        from lens_steer.coconut.train import TrainConfig

        return TrainConfig(
            mode=mode, epochs=self.epochs, epochs_per_stage=self.epochs_per_stage,
            stage0_epochs=self.stage0_epochs,
            max_latent_stage=self.max_latent_stage, c=self.c,
            pad_latent_to_max=self.pad_latent_to_max, reset_optimizer=self.reset_optimizer,
            lr=self.lr, batch_size=self.batch_size, bf16=self.bf16,
            num_threads=self.num_threads, time_budget_s=float(self.time_budget_s.get(mode, 0)),
            seed=self.seed, val_every_stage=self.val_every_stage,
            question_loss_weight=self.question_loss_weight)


def _load_config(path: str | None, sets: list[str]) -> CoconutRunConfig:
    raw = json.loads(Path(path).read_text()) if path else {}
    names = {f.name: f for f in dataclasses.fields(CoconutRunConfig)}
    for s in sets or []:
        key, _, val = s.partition("=")
        if key not in names:
            raise SystemExit(f"--set: unknown field {key!r}; fields: {sorted(names)}")
        try:
            raw[key] = json.loads(val)
        except json.JSONDecodeError:
            raw[key] = val
    unknown = set(raw) - set(names)
    if unknown:
        raise SystemExit(f"unknown config fields {sorted(unknown)}")
    return CoconutRunConfig(**raw)


def _cpu_conditions() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "loadavg": load, "platform": platform.platform()}


def _save_model(model, tok, out: Path) -> None:
    from lens_steer.io import save_tensors, write_json

    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    write_json(out / "config.json", model.config.to_dict())
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"
          or not model.config.tie_word_embeddings}
    save_tensors(out / "model.safetensors", sd)


def load_saved_model(path: str | Path):
    """(model, tokenizer, latent ids) from a folder written by `coconut train` / `run`."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from lens_steer.coconut.model import add_latent_tokens
    from lens_steer.io import load_tensors, read_json

    path = Path(path)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    model = Qwen2ForCausalLM(Qwen2Config(**read_json(path / "config.json")))
    model.load_state_dict(load_tensors(path / "model.safetensors"), strict=False)
    model.tie_weights()
    ids = add_latent_tokens(model, tok)
    model.eval()
    return model, tok, ids


def _make_data(cfg: CoconutRunConfig):
    from lens_steer.coconut.data import generate_prosqa

    kw = dict(n_concepts=cfg.n_concepts, hops=cfg.hops, extra_edge_ratio=cfg.extra_edge_ratio)
    return (generate_prosqa(cfg.n_train, seed=cfg.seed * 1000 + 1, **kw),
            generate_prosqa(cfg.n_val, seed=cfg.seed * 1000 + 2, **kw),
            generate_prosqa(cfg.n_test, seed=cfg.seed * 1000 + 3, **kw))


def _styled(cfg_or_style, examples):
    from lens_steer.coconut.data import compact_text

    style = getattr(cfg_or_style, "text_style", cfg_or_style)
    return [compact_text(e) for e in examples] if style == "compact" else list(examples)


def _fresh_model(cfg: CoconutRunConfig):
    from lens_steer.coconut.model import (
        add_latent_tokens,
        build_model,
        build_word_tokenizer,
        vocab_words,
    )

    tok = build_word_tokenizer(vocab_words())
    model = build_model(tok, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                        seed=cfg.seed)
    ids = add_latent_tokens(model, tok)
    return model, tok, ids


def run(cfg: CoconutRunConfig, out: Path) -> dict:
    """Train and evaluate every method, inspect Coconut's thoughts; write the run folder."""
    import torch

    from lens_steer.coconut.data import save_prosqa
    from lens_steer.coconut.evaluate import evaluate
    from lens_steer.coconut.train import train
    from lens_steer.io import write_json, write_jsonl, write_text

    t_run = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    write_json(out / "config.json", asdict(cfg))
    train_ex, val_ex, test_ex = _make_data(cfg)
    for name, exs in (("train", train_ex), ("val", val_ex), ("test", test_ex)):
        save_prosqa(out / "data" / f"{name}.json", exs)
    train_ex, val_ex, test_ex = (_styled(cfg, x) for x in (train_ex, val_ex, test_ex))
    metrics: dict = {"config": asdict(cfg), "conditions_start": _cpu_conditions(), "methods": {}}
    records, history = [], []
    models = {}
    for mode in cfg.methods:
        model, tok, ids = _fresh_model(cfg)
        tcfg = cfg.train_config(mode)
        write_json(out / "models" / mode / "train_config.json", tcfg.to_dict())
        write_json(out / "models" / mode / "run_config.json", asdict(cfg))
        res = train(model, tok, ids, train_ex, tcfg, val_examples=val_ex)
        _save_model(model, tok, out / "models" / mode)
        t_eval = time.perf_counter()
        torch.manual_seed(cfg.seed)
        m, rec = evaluate(model, tok, ids, test_ex, mode=mode, n_latents=tcfg.eval_latents)
        m.update(train_seconds=res.seconds, optimizer_steps=res.optimizer_steps,
                 epochs_done=len(res.history), stopped_by_budget=res.stopped_by_budget,
                 eval_seconds=time.perf_counter() - t_eval, conditions=_cpu_conditions(),
                 n_params=sum(p.numel() for p in model.parameters()))
        if mode == "coconut":                 # the same model with fewer / more thoughts
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
        metrics["inspect"] = _inspect(models["coconut"], test_ex[:cfg.n_inspect], cfg, out)
    metrics["wall_seconds"] = time.perf_counter() - t_run
    metrics["conditions_end"] = _cpu_conditions()
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", report_markdown(metrics))
    return metrics


def _inspect(bundle, examples, cfg: CoconutRunConfig, out: Path) -> dict:
    from lens_steer.coconut.inspect import (
        frontier_mass,
        latent_activations,
        latent_node_probs,
        plot_frontier_mass,
    )
    from lens_steer.io import save_tensors, write_json, write_jsonl

    model, tok, ids, tcfg = bundle
    k = tcfg.eval_latents
    info: dict = {"n_problems": len(examples), "n_latents": k}
    if k == 0 or not examples:
        return info
    lens = latent_node_probs(model, tok, ids, examples, n_latents=k)
    write_jsonl(out / "lens.jsonl", lens)
    summary = frontier_mass(lens)
    info["frontier_mass"] = summary
    plot_frontier_mass(summary, out / "frontier_mass.png",
                       title=f"Coconut logit lens, {len(examples)} test problems")
    layers = list(cfg.probe_layers) or None
    acts, labels, groups = latent_activations(model, tok, ids, examples, n_latents=k,
                                              layers=layers, label="thought")
    save_tensors(out / "latent_activations.safetensors",
                 {f"layer{lyr}": a for lyr, a in acts.items()},
                 metadata={"labels": json.dumps(labels), "groups": json.dumps(groups)})
    from probes import probe_layers

    try:
        for label in ("thought", "frontier_has_target"):
            acts, labels, groups = latent_activations(model, tok, ids, examples, n_latents=k,
                                                      layers=layers, label=label)
            rep = probe_layers(acts, labels, groups)
            rep.save(out / "probes" / label)
            js = rep.to_json()
            js = json.loads(js) if isinstance(js, str) else js
            info.setdefault("probes", {})[label] = {
                "best_layer": js.get("best_layer"), "metric": js.get("best_layer_metric"),
                "class_counts": js.get("class_counts"),
                "accuracy_by_layer": {row["layer"]: row.get("accuracy_mean")
                                      for row in js.get("layers", [])},
                "full_report": f"probes/{label}/metrics.json"}
        write_json(out / "probes" / "summary.json", info["probes"])
    except Exception as e:  # the probes API is a teammate's; record, don't lose the run
        info["probes"] = f"failed: {type(e).__name__}: {e}"
    return info


def report_markdown(metrics: dict) -> str:
    cfg = metrics["config"]
    lines = ["# Coconut vs CoT vs no-CoT (ProsQA-style, generated)", "",
             f"Model: Qwen2 d_model={cfg['d_model']}, {cfg['n_layers']} layers, from scratch; "
             f"{cfg['n_train']} training problems, {cfg['epochs']} epochs each; "
             f"test n={cfg['n_test']}; text style {cfg['text_style']}.", "",
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
                  " frontier share of node mass |", "|---|---|---|---|---|---|---|"]
        for t, s in fm.items():
            lines.append(f"| {int(t) + 1} | {s['frontier']:.3f} | {s['other_reachable']:.3f} | "
                         f"{s['unreachable']:.3f} | {s['root']:.3f} | {s['target']:.3f} | "
                         f"{s['frontier_share']:.3f} |")
    pr = metrics.get("inspect", {}).get("probes")
    if isinstance(pr, str):
        lines += ["", f"Probes: {pr}"]
    elif isinstance(pr, dict):
        lines += ["", "Probes on continuous-thought activations (grouped CV, see probes/):", ""]
        for label, rep in pr.items():
            accs = ", ".join(f"L{k}: {v:.2f}" for k, v in rep["accuracy_by_layer"].items()
                             if isinstance(v, (int, float)))
            lines.append(f"- label `{label}` (classes {rep.get('class_counts')}): best layer "
                         f"{rep.get('best_layer')}; accuracy by layer {accs}")
    lines += ["", f"CPU at start: {metrics['conditions_start']}", ""]
    return "\n".join(lines)


def _cmd(args) -> int:
    from lens_steer.io import write_json, write_jsonl

    if args.action == "run":
        cfg = _load_config(args.config, args.set)
        m = run(cfg, Path(args.out))
        print(report_markdown(m))
        return 0
    if args.action == "train":
        from lens_steer.coconut.train import train

        cfg = _load_config(args.config, args.set)
        out = Path(args.out)
        train_ex, val_ex, _ = (_styled(cfg, x) for x in _make_data(cfg))
        model, tok, ids = load_saved_model(args.init) if args.init else _fresh_model(cfg)
        tcfg = cfg.train_config(args.mode)
        write_json(out / "run_config.json", asdict(cfg))
        write_json(out / "train_config.json", tcfg.to_dict())
        if args.init:
            write_json(out / "init.json", {"init": str(args.init)})
        res = train(model, tok, ids, train_ex, tcfg, val_examples=val_ex)
        _save_model(model, tok, out)
        write_jsonl(out / "history.jsonl", res.history)
        print(f"saved {out} ({res.seconds:.0f}s, {res.optimizer_steps} steps)")
        return 0
    if args.action == "eval":
        from lens_steer.coconut.data import load_prosqa
        from lens_steer.coconut.evaluate import evaluate
        from lens_steer.io import read_json

        model, tok, ids = load_saved_model(args.model)
        tc = read_json(Path(args.model) / "train_config.json")
        k = args.latents if args.latents is not None else (
            tc["max_latent_stage"] * tc["c"] if tc["mode"] == "coconut" else 0)
        rc = Path(args.model) / "run_config.json"
        style = read_json(rc)["text_style"] if rc.exists() else "prosqa"
        exs = _styled(style, load_prosqa(args.data)[: args.limit or None])
        m, rec = evaluate(model, tok, ids, exs, mode=tc["mode"], n_latents=k)
        if args.out:
            write_json(Path(args.out) / "metrics.json", m)
            write_jsonl(Path(args.out) / "records.jsonl", rec)
        print(json.dumps(m, indent=2))
        return 0
    return 1


def register(subparsers) -> None:
    p = subparsers.add_parser("coconut", help="Coconut continuous thoughts vs CoT / no-CoT",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "train", "eval"))
    p.add_argument("--out", help="run folder (run/train) or metrics folder (eval)")
    p.add_argument("--config", help="config JSON (e.g. a run folder's config.json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (value parsed as JSON when possible)")
    p.add_argument("--mode", choices=METHODS, default="coconut", help="train: which method")
    p.add_argument("--init", help="train: start from this saved model folder instead of a fresh "
                   "one (e.g. a CoT model, with --set stage0_epochs=0: the paper's GSM8k recipe)")
    p.add_argument("--model", help="eval: a saved model folder")
    p.add_argument("--data", help="eval: a ProsQA-format JSON file")
    p.add_argument("--latents", type=int, help="eval: continuous thoughts (default: trained max)")
    p.add_argument("--limit", type=int, default=0, help="eval: first N problems only")

    def func(args):
        if args.action in ("run", "train") and not args.out:
            p.error("--out is required")
        if args.init and args.action != "train":
            p.error("--init only applies to `coconut train`")
        if args.init and not (Path(args.init) / "model.safetensors").exists():
            p.error(f"--init {args.init}: no model.safetensors there (a `coconut train` / `run` "
                    "models/<method> folder is needed)")
        if args.action == "eval" and not (args.model and args.data):
            p.error("eval needs --model and --data")
        return _cmd(args)

    p.set_defaults(func=func)
