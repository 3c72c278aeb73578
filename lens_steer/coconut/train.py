"""Train Coconut (curriculum over latent stages) or the CoT / no-CoT baselines on ProsQA-format data.

    cfg = TrainConfig(mode="coconut", val_size=100)   # the official ProsQA schedule
    result = train(model, tok, ids, train_examples, cfg, val_examples=val)
    result.history                 # per-epoch loss, stage, seconds, validation accuracy
    result.selected_epoch          # the best-validation epoch, whose weights the model now holds
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
    stage_plan,
    tokenize_example,
)
from lens_steer.coconut.model import LatentIds, continuous_forward


@dataclass
class TrainConfig:
    """How one model is trained (Coconut curriculum or a baseline). The defaults are the
    official ProsQA recipe (facebookresearch/coconut `args/prosqa_coconut.yaml` and `run.py`);
    every departure from it is an option here."""

    mode: str = "coconut"
    """`coconut` (latent curriculum), `cot` (question, steps, answer) or `nocot` (question, answer)."""
    epochs: int = 50
    """Passes over the training set."""
    epochs_per_stage: int = 5
    """Coconut: epochs at each curriculum stage (stage = epoch // epochs_per_stage)."""
    stage0_epochs: int | None = None
    """Coconut: epochs at stage 0 (plain CoT with empty markers) before the first latent stage;
    None = `epochs_per_stage` (official). 0 starts at stage 1, e.g. from a CoT model (the
    official GSM8k recipe)."""
    max_latent_stage: int = 6
    """Coconut: last stage that adds latents; past it all steps are removed."""
    c: int = 1
    """Coconut: continuous thoughts per removed reasoning step (official GSM8k: 2)."""
    pad_latent_to_max: bool = True
    """Coconut: always use stage*c latents even when a problem has fewer steps than the stage."""
    uniform_prob: float = 0.0
    """Coconut: probability that a training example uses a stage drawn uniformly from 0..its
    number of steps instead of the scheduled one (official: 0; 0.3 in the paper's analysis)."""
    reset_optimizer: str = "epoch"
    """Fresh AdamW state: `epoch` (official: every epoch), `stage` (at each stage change) or
    `never`."""
    lr: float = 1e-4
    """AdamW learning rate (constant after `warmup_steps`)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up after each optimizer reset (official: 0)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    grad_clip: float = 0.0
    """Max gradient norm (0 = off, official)."""
    bf16: bool = False
    """bf16 autocast on CPU (about 2.6x faster than fp32 here; official: fp32)."""
    num_threads: int = 0
    """torch.set_num_threads during training (0 = leave as is)."""
    time_budget_s: float = 0.0
    """Stop after this many seconds of training (0 = no limit); recorded in the history."""
    seed: int = 0
    """Shuffling, stage-mixing and initialisation seed."""
    question_loss_weight: float = 0.0
    """Weight of an auxiliary next-token loss on the question tokens, added to the loss on
    steps + answer (0 = off, official, whose GPT-2 starts pretrained). The question's
    statements mention the graph's concepts, so predicting them teaches a from-scratch model to
    copy concepts from its context; every method gets the same term."""
    val_size: int = 0
    """Validation problems scored (greedy accuracy) after every epoch (0 = no validation)."""
    validate: str = "epoch"
    """When to validate: `epoch` (official) or `stage` (at each stage's last epoch; cheaper)."""
    select: str = "best_val"
    """Which weights to keep: `best_val` (the epoch with the best validation accuracy among
    those validated with the inference latent count, i.e. Coconut stages >= max_latent_stage,
    as the official eval config) or `last`."""
    eval_max_new_tokens: int = 128
    """Greedy tokens generated for validation (official: 128; GSM8k 64)."""

    def __post_init__(self) -> None:
        from lens_steer.errors import ConfigError

        if isinstance(self.reset_optimizer, bool):             # older configs: True / False
            self.reset_optimizer = "epoch" if self.reset_optimizer else "never"
        checks = [(self.mode in MODES, f"mode must be one of {MODES}, not {self.mode!r}"),
                  (self.reset_optimizer in RESETS, f"reset_optimizer must be one of {RESETS}"),
                  (self.validate in ("epoch", "stage"), "validate must be 'epoch' or 'stage'"),
                  (self.select in ("best_val", "last"), "select must be 'best_val' or 'last'"),
                  (0 <= self.uniform_prob <= 1, "uniform_prob must be in [0, 1]"),
                  (self.stage0_epochs is None or self.stage0_epochs >= 0,
                   "stage0_epochs must be >= 0 (or None)"),
                  (self.max_latent_stage >= 0, "max_latent_stage must be >= 0"),
                  (math.isfinite(self.lr) and self.lr > 0, "lr must be a finite number > 0")]
        for name in ("epochs", "epochs_per_stage", "c", "batch_size", "eval_max_new_tokens"):
            checks.append((getattr(self, name) >= 1, f"{name} must be >= 1"))
        for name in ("weight_decay", "grad_clip", "warmup_steps", "time_budget_s", "num_threads",
                     "val_size", "question_loss_weight"):
            checks.append((getattr(self, name) >= 0, f"{name} must be >= 0"))
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def eval_latents(self) -> int:
        """Latents used at inference: the last stage's count (padded to max)."""
        return self.max_latent_stage * self.c if self.mode == "coconut" else 0

    def stage(self, epoch: int) -> int:
        """Curriculum stage of `epoch` (0 for the baselines)."""
        if self.mode != "coconut":
            return 0
        return scheduled_stage(epoch, self.epochs_per_stage, self.stage0_epochs)

    def to_dict(self) -> dict:
        return asdict(self)


RESETS = ("epoch", "stage", "never")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    """Training wall time, validation excluded."""
    optimizer_steps: int = 0
    stopped_by_budget: bool = False
    selected_epoch: int = -1
    """Epoch whose weights the model holds at the end (best validation, or the last)."""
    selected_val_accuracy: float | None = None


def _optimizer(model, cfg: TrainConfig):
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _example_stage(rng: random.Random, cfg: TrainConfig, stage: int, n_steps: int) -> int:
    """The scheduled stage, or with probability `uniform_prob` one drawn from 0..n_steps."""
    if cfg.mode == "coconut" and cfg.uniform_prob and rng.random() < cfg.uniform_prob:
        return rng.randint(0, n_steps)
    return stage


def train(model, tokenizer, ids: LatentIds, examples, cfg: TrainConfig, *,
          val_examples=None, progress: bool = True) -> TrainResult:
    """Train `model` (a HF causal LM) in place on `examples` (ProsQAExample list) under `cfg`;
    with `select="best_val"` it ends holding the best-validation weights."""
    from lens_steer.coconut.evaluate import evaluate

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    toks = [tokenize_example(tokenizer, e) for e in examples]
    val = list(val_examples or [])[:cfg.val_size]
    model.train()
    opt, since_reset = _optimizer(model, cfg), 0
    result = TrainResult()
    t0 = time.perf_counter()
    val_s = 0.0                       # validation time, not counted against the budget
    best: tuple[float, int, dict] | None = None
    n_batches = math.ceil(len(toks) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * n_batches, desc=f"train {cfg.mode}", disable=not progress,
               mininterval=5.0)
    # baselines keep stage 0 but use Coconut's stage boundaries for `validate="stage"`
    period = TrainConfig(**{**cfg.to_dict(), "mode": "coconut"}).stage
    for epoch in range(cfg.epochs):
        stage = cfg.stage(epoch)
        new_stage = epoch > 0 and stage != cfg.stage(epoch - 1)
        if epoch > 0 and (cfg.reset_optimizer == "epoch"
                          or (cfg.reset_optimizer == "stage" and new_stage)):
            opt, since_reset = _optimizer(model, cfg), 0
        order = list(range(len(toks)))
        rng.shuffle(order)
        losses, q_losses = [], []
        for b in range(n_batches):
            seqs = [build_sequence(toks[i], cfg.mode, ids,
                                   stage=_example_stage(rng, cfg, stage, len(toks[i].steps)),
                                   c=cfg.c, max_latent_stage=cfg.max_latent_stage,
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
        last = epoch == cfg.epochs - 1 or result.stopped_by_budget
        due = cfg.validate == "epoch" or period(epoch + 1) != period(epoch) or last
        if val and due:
            n_lat = 0
            if cfg.mode == "coconut":
                n_lat = stage_plan(stage, 10**6, c=cfg.c, max_latent_stage=cfg.max_latent_stage,
                                   pad_latent_to_max=True)[1]
            tv = time.perf_counter()
            m, _ = evaluate(model, tokenizer, ids, val, mode=cfg.mode, n_latents=n_lat,
                            max_new_tokens=cfg.eval_max_new_tokens)
            model.train()
            val_s += time.perf_counter() - tv
            row.update(val_accuracy=m["accuracy"], val_latents=n_lat,
                       val_generated_tokens=m["mean_generated_tokens"])
            if n_lat == cfg.eval_latents and (best is None or m["accuracy"] > best[0]):
                best = (m["accuracy"], epoch,
                        {k: v.detach().clone() for k, v in model.state_dict().items()})
        result.history.append(row)
        tqdm.write(f"[{cfg.mode}] " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if result.stopped_by_budget:
            break
    bar.close()
    result.seconds = time.perf_counter() - t0 - val_s
    if cfg.select == "best_val" and best is not None:
        model.load_state_dict(best[2])
        result.selected_epoch, result.selected_val_accuracy = best[1], best[0]
    else:
        result.selected_epoch = len(result.history) - 1
    model.eval()
    return result
