"""Train the toy reasoner from a seed: BPE tokenizer on the corpus, then a tiny Qwen2 LM.

    from lens_steer.toy.train import TrainConfig, train
    path = train(TrainConfig(out_dir="runs/toy"))     # a standard HF directory

The output directory is written to a temp folder beside it and renamed at the end, so a crash
never leaves a half-written model directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lens_steer.io import atomic_dir, write_json
from lens_steer.toy.problems import ToyProblem, generate_problems

EOS_TEXT = "<|endoftext|>"


@dataclass
class TrainConfig:
    """Everything `train` needs; saved as `training_config.json` beside the weights."""

    out_dir: str = "runs/toy"
    """Where the HF model directory is written (replaced atomically)."""
    seed: int = 0
    """Seed for problems, initialisation and batch order."""
    n_problems: int = 20_000
    """Distinct training problems (seed `seed`); held-out evaluation uses another seed."""
    concise_fraction: float = 0.2
    """Share of training examples given the concise trace instead of the verbose one."""
    vocab_size: int = 512
    """BPE vocabulary size (the trainer may stop earlier on this small corpus)."""
    d_model: int = 128
    """Residual width."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Query heads (head dim = d_model / n_heads)."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    d_mlp: int = 512
    """SwiGLU hidden width."""
    max_positions: int = 512
    """max_position_embeddings of the config."""
    steps: int = 1200
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 4e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup_steps: int = 40
    """Linear warmup steps."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    bf16: bool = True
    """bf16 autocast on CPU (about 2.6x faster than fp32 here); weights stay fp32."""
    threads: int = 1
    """torch intra-op threads (1 is much faster than 2 when other jobs share the cores)."""
    max_minutes: float | None = None
    """Stop early after this many minutes (breaks exact reproducibility; None = off)."""
    save_dtype: str = "float16"
    """dtype of the saved weights."""
    init_from: str | None = None
    """Continue from this saved model directory (its tokenizer and weights) instead of
    training a tokenizer and initialising from scratch."""

    def __post_init__(self) -> None:
        from lens_steer.errors import ConfigError

        for name in ("lr", "weight_decay", "grad_clip", "concise_fraction"):
            value = getattr(self, name, 0.0)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise ConfigError("lr must be > 0")


def training_texts(problems: list[ToyProblem], concise_fraction: float, seed: int
                   ) -> list[tuple[str, str]]:
    """(prompt, completion + EOS) pairs; a seeded `concise_fraction` get the concise trace."""
    rng = random.Random(seed + 1)
    out = []
    for p in problems:
        style = "concise" if rng.random() < concise_fraction else "verbose"
        trace = p.concise_trace if style == "concise" else p.verbose_trace
        out.append((p.prompt, trace + EOS_TEXT))
    return out


def build_model(cfg: TrainConfig, tokenizer):
    """A freshly initialised `Qwen2ForCausalLM` for `tokenizer`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, rms_norm_eps=1e-6,
    )
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


def encode_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + completion, and how many leading (prompt) tokens carry no loss."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    fulls = tokenizer([p + c for p, c in pairs], add_special_tokens=False)["input_ids"]
    return [(f, len(p)) for p, f in zip(prompts, fulls, strict=True)]


def make_batches(examples: list[tuple[list[int], int]], batch_size: int, rng: random.Random
                 ) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), in random order."""
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    chunk = batch_size * 32
    batches = []
    for i in range(0, len(idx), chunk):
        part = sorted(idx[i:i + chunk], key=lambda j: len(examples[j][0]))
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[tuple[list[int], int]], pad_id: int
            ) -> tuple[Int[Tensor, "b t"], Int[Tensor, "b t"], Int[Tensor, "b t"]]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on prompt and padding."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (seq, n_prompt) in enumerate(examples):
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        labels[b, n_prompt:len(seq)] = ids[b, n_prompt:len(seq)]
    return ids, mask, labels


def lm_loss(model, ids: Int[Tensor, "b t"], mask: Int[Tensor, "b t"],
            labels: Int[Tensor, "b t"], bf16: bool) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over labelled positions."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=-100)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train from `cfg.seed` and save an HF model directory at `cfg.out_dir`; returns its path.

    Writes config.json, model.safetensors, tokenizer files, `training_config.json` and
    `training_log.json` (loss curve, wall time).
    """
    from lens_steer.tokenization import train_bpe_tokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    t0 = time.time()

    out = Path(cfg.out_dir)
    with atomic_dir(out) as tmp:
        problems = generate_problems(cfg.n_problems, cfg.seed)
        pairs = training_texts(problems, cfg.concise_fraction, cfg.seed)
        corpus = [p + c.removesuffix(EOS_TEXT) for p, c in pairs]
        if cfg.init_from:
            from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

            tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.init_from)
            tokenizer.save_pretrained(tmp)
            model = Qwen2ForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
        else:
            tokenizer = train_bpe_tokenizer(corpus, tmp, vocab_size=cfg.vocab_size)
            model = build_model(cfg, tokenizer)
        examples = encode_examples(tokenizer, pairs)
        model.train()

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(0.9, 0.95))
        batches: list[list[int]] = []
        losses: list[float] = []
        bar = tqdm(range(cfg.steps), desc="toy train", disable=not progress)
        for step in bar:
            if not batches:
                batches = make_batches(examples, cfg.batch_size, rng)
            ids, mask, labels = collate([examples[i] for i in batches.pop()],
                                        tokenizer.pad_token_id)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = lm_loss(model, ids, mask, labels, cfg.bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
            if cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes:
                break

        model.eval()
        model.to(getattr(torch, cfg.save_dtype))
        model.config.dtype = cfg.save_dtype
        model.save_pretrained(tmp)
        write_json(tmp / "training_config.json", asdict(cfg))
        write_json(tmp / "training_log.json", {
            "steps_done": len(losses), "wall_time_s": round(time.time() - t0, 1),
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
            "loss_every_10": losses[::10], "n_params": sum(p.numel() for p in model.parameters()),
            "torch_threads": cfg.threads, "cpu_count": os.cpu_count(),
        })
    return out


def ship(model_dir: str | Path, metrics: dict | None = None, dest: str | Path | None = None
         ) -> Path:
    """Copy a trained model directory to the packaged `TOY_MODEL_DIR` (atomically), with
    `eval_metrics.json` when `metrics` is given."""
    from lens_steer.toy import TOY_MODEL_DIR

    dest = Path(dest or TOY_MODEL_DIR)
    with atomic_dir(dest) as tmp:
        for f in Path(model_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        if metrics is not None:
            write_json(tmp / "eval_metrics.json", metrics)
    return dest


SHIPPED_RECIPE: tuple[dict, ...] = (
    {},
    {"seed": 1, "steps": 1000, "lr": 2e-3, "warmup_steps": 20},
    {"seed": 3, "steps": 200, "lr": 1e-3, "warmup_steps": 10, "concise_fraction": 0.15},
)
"""How the shipped model was trained: stage 1 (the defaults) for accuracy, stage 2 continues it
on new problems, stage 3 (fewer concise traces) makes verbose the usual greedy style while
keeping concise within reach of a steering vector (ASC). Each stage
continues from the previous one (`init_from`)."""


def train_recipe(out_dir: str | Path, recipe: tuple[dict, ...] = SHIPPED_RECIPE,
                 progress: bool = True) -> Path:
    """Run `recipe`'s stages (TrainConfig overrides) in turn; the last one lands at `out_dir`."""
    out_dir = Path(out_dir)
    prev: str | None = None
    t0 = time.time()
    for i, overrides in enumerate(recipe):
        last = i == len(recipe) - 1
        stage_dir = out_dir if last else out_dir.with_name(f"{out_dir.name}.stage{i + 1}")
        prev = str(train(TrainConfig(**{**overrides, "out_dir": str(stage_dir),
                                        "init_from": prev}), progress=progress))
    write_recipe_log(out_dir, len(recipe), total_wall_time_s=round(time.time() - t0, 1))
    return Path(prev)


def write_recipe_log(out_dir: str | Path, n_stages: int, total_wall_time_s: float) -> None:
    """`training_recipe.json` in the last stage's folder: every stage's config and log."""
    out_dir = Path(out_dir)
    stages = []
    for i in range(n_stages):
        d = out_dir if i == n_stages - 1 else out_dir.with_name(f"{out_dir.name}.stage{i + 1}")
        log = json.loads((d / "training_log.json").read_text())
        stages.append({"config": json.loads((d / "training_config.json").read_text()),
                       **{k: log[k] for k in ("wall_time_s", "steps_done", "final_loss")}})
    write_json(out_dir / "training_recipe.json", {
        "stages": stages, "total_wall_time_s": total_wall_time_s,
        "torch_threads": stages[-1]["config"]["threads"], "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg())})
