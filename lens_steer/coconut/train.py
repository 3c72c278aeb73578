"""Train Coconut (curriculum over latent stages) or the CoT / no-CoT baselines on ProsQA-format data.

    cfg = TrainConfig(mode="coconut", epochs=28, epochs_per_stage=3, max_latent_stage=6)
    result = train(model, tok, ids, train_examples, cfg, val_examples=val[:100])
    result.history                 # per-epoch loss, stage, seconds (+ val accuracy per stage)
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from lens_steer.coconut.curriculum import (
    MODES,
    build_sequence,
    collate,
    scheduled_stage,
    tokenize_example,
)
from lens_steer.coconut.model import LatentIds, continuous_forward


@dataclass
class TrainConfig:
    """How one model is trained (Coconut curriculum or a baseline)."""

    mode: str = "coconut"
    """`coconut` (latent curriculum), `cot` (question, steps, answer) or `nocot` (question, answer)."""
    epochs: int = 20
    """Passes over the training set."""
    epochs_per_stage: int = 3
    """Coconut: epochs at each curriculum stage (stage = epoch // epochs_per_stage)."""
    stage0_epochs: int | None = None
    """Coconut: epochs at stage 0 (plain CoT, no latents) before the first latent stage; None =
    `epochs_per_stage`. A from-scratch model must first learn to follow edges in writing (the
    paper's GSM8k runs start Coconut from a separately trained CoT model for the same reason)."""
    max_latent_stage: int = 6
    """Coconut: last stage that adds latents; past it all steps are removed."""
    c: int = 1
    """Coconut: continuous thoughts per removed reasoning step."""
    pad_latent_to_max: bool = True
    """Coconut: always use stage*c latents even when a problem has fewer steps than the stage."""
    reset_optimizer: bool = True
    """Coconut: fresh optimizer state at every stage change (as in the paper)."""
    lr: float = 1e-3
    """AdamW learning rate (linear warm-up over `warmup_steps`, then constant)."""
    warmup_steps: int = 50
    """Optimizer steps of linear warm-up (also after each optimizer reset)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    grad_clip: float = 1.0
    """Max gradient norm (0 = off)."""
    bf16: bool = True
    """bf16 autocast on CPU (about 2.6x faster than fp32 here)."""
    num_threads: int = 0
    """torch.set_num_threads during training (0 = leave as is)."""
    time_budget_s: float = 0.0
    """Stop after this many seconds of training (0 = no limit); recorded in the history."""
    seed: int = 0
    """Shuffling and initialisation seed."""
    question_loss_weight: float = 0.0
    """Weight of an auxiliary next-token loss on the question tokens, added to the loss on
    steps + answer (0 = off, as in the paper, whose GPT-2 starts pretrained). The question's
    statements mention the graph's concepts, so predicting them teaches a from-scratch model to
    copy concepts from its context; every method gets the same term."""
    val_every_stage: int = 0
    """Coconut/baselines: greedy accuracy on this many validation problems at each stage end
    (baselines: every `epochs_per_stage` epochs); 0 = off."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        for name in ("epochs", "epochs_per_stage", "c", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.stage0_epochs is not None and self.stage0_epochs < 0:
            raise ValueError("stage0_epochs must be >= 0 (or None)")
        if self.max_latent_stage < 0:
            raise ValueError("max_latent_stage must be >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0; weight_decay, grad_clip, warmup_steps >= 0")
        if min(self.time_budget_s, self.num_threads, self.val_every_stage,
               self.question_loss_weight) < 0:
            raise ValueError("time_budget_s, num_threads, val_every_stage, question_loss_weight"
                             " must be >= 0")

    @property
    def eval_latents(self) -> int:
        """Latents used at inference: the last stage's count (padded to max)."""
        return self.max_latent_stage * self.c if self.mode == "coconut" else 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    """Training wall time, validation excluded."""
    optimizer_steps: int = 0
    stopped_by_budget: bool = False


def _optimizer(model, cfg: TrainConfig):
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(model, tokenizer, ids: LatentIds, examples, cfg: TrainConfig, *,
          val_examples=None, progress: bool = True) -> TrainResult:
    """Train `model` in place on `examples` (ProsQAExample list) under `cfg`."""
    from lens_steer.coconut.evaluate import evaluate

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    toks = [tokenize_example(tokenizer, e) for e in examples]
    model.train()
    opt = _optimizer(model, cfg)
    since_reset = 0
    result = TrainResult()
    t0 = time.perf_counter()
    val_s = 0.0                       # validation time, not counted against the budget
    stage_prev = None
    n_batches = math.ceil(len(toks) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * n_batches, desc=f"train {cfg.mode}", disable=not progress,
               mininterval=5.0)
    def period(e: int) -> int:        # baselines keep stage 0 but validate on the same cadence
        return scheduled_stage(e, cfg.epochs_per_stage,
                               cfg.stage0_epochs if cfg.mode == "coconut" else None)

    for epoch in range(cfg.epochs):
        stage = period(epoch) if cfg.mode == "coconut" else 0
        if stage_prev is not None and stage != stage_prev and cfg.reset_optimizer:
            opt, since_reset = _optimizer(model, cfg), 0
        stage_prev = stage
        order = list(range(len(toks)))
        rng.shuffle(order)
        losses, q_losses = [], []
        for b in range(n_batches):
            seqs = [build_sequence(toks[i], cfg.mode, ids, stage=stage, c=cfg.c,
                                   max_latent_stage=cfg.max_latent_stage,
                                   pad_latent_to_max=cfg.pad_latent_to_max)
                    for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            batch = collate(seqs, tokenizer.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (since_reset + 1) / max(cfg.warmup_steps, 1))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                out = continuous_forward(model, batch["input_ids"], batch["attention_mask"],
                                         ids.latent, labels=batch["labels"])
            loss = out.loss
            if cfg.question_loss_weight:
                q_loss = torch.nn.functional.cross_entropy(
                    out.logits[:, :-1].flatten(0, 1).float(),
                    batch["question_labels"][:, 1:].flatten(), ignore_index=-100)
                loss = loss + cfg.question_loss_weight * q_loss
                q_losses.append(q_loss.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            since_reset += 1
            result.optimizer_steps += 1
            losses.append(out.loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, stage=stage, loss=f"{losses[-1]:.3f}", refresh=False)
            if cfg.time_budget_s and time.perf_counter() - t0 - val_s > cfg.time_budget_s:
                result.stopped_by_budget = True
                break
        row = {"epoch": epoch, "stage": stage, "loss": sum(losses) / max(len(losses), 1),
               "train_seconds": time.perf_counter() - t0 - val_s,
               "optimizer_steps": result.optimizer_steps}
        if q_losses:
            row["question_loss"] = sum(q_losses) / len(q_losses)
        last_of_stage = period(epoch + 1) != period(epoch) or epoch == cfg.epochs - 1
        if cfg.val_every_stage and val_examples and (last_of_stage or result.stopped_by_budget):
            n_lat = 0
            if cfg.mode == "coconut":
                from lens_steer.coconut.curriculum import stage_plan
                n_lat = stage_plan(stage, 10**6, c=cfg.c, max_latent_stage=cfg.max_latent_stage,
                                   pad_latent_to_max=True)[1]
            tv = time.perf_counter()
            m, _ = evaluate(model, tokenizer, ids, val_examples[:cfg.val_every_stage],
                            mode=cfg.mode, n_latents=n_lat)
            val_s += time.perf_counter() - tv
            row.update(val_accuracy=m["accuracy"], val_latents=n_lat,
                       val_generated_tokens=m["mean_generated_tokens"])
        result.history.append(row)
        tqdm.write(f"[{cfg.mode}] " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if result.stopped_by_budget:
            break
    bar.close()
    result.seconds = time.perf_counter() - t0 - val_s
    model.eval()
    return result
