"""The steering pipeline the sweeps share: one loaded model, one cache, resumable eval points.

    pipe = SteeringPipeline(cfg, run)                 # loads the model once
    pipe.cache                                        # thought cache of the extraction split
    vec = pipe.seal_vector(layer=4, variant="both")
    summary = pipe.evaluate("seal-L4-a1", [vec.intervention(pipe.model, scale=1.0)])

Every evaluation point is a stage of the run folder: an interrupted sweep resumes where it
stopped, re-using finished points.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from experiments.common import (
    StudyConfig,
    as_eval_problems,
    default_layer,
    generate_traces,
    generation_config,
    load_study_model,
    planned_batch_size,
    toy_splits,
    validation_split,
)
from experiments.run_folder import RunFolder


@dataclasses.dataclass
class SteeringStudyConfig(StudyConfig):
    method: str = "seal"
    """"seal" (alpha * S at thought delimiters) or "asc" (gamma * v at every newest position)."""
    layer: int | None = None
    """Steered layer; None = about 2/3 of the depth."""
    alpha: float = 1.0
    """SEAL strength (H <- H + alpha * S)."""
    variant: str = "both"
    """SEAL variant: thoughts suppressed: "both", "reflection" or "transition"."""
    epsilon: float = 1e-3
    """ASC: KL budget of the gamma calibration."""
    n_calibration: int = 50
    """ASC: calibration states."""
    asc_gamma: float | None = None
    """ASC: a fixed gamma instead of the KL-calibrated one (which is still computed and
    recorded); strength sweeps then take multiples of it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in ("seal", "asc"):
            raise ValueError(f"unknown method {self.method!r}: use 'seal' or 'asc'")


class SteeringPipeline:
    def __init__(self, cfg: SteeringStudyConfig, run: RunFolder, model: Any = None,
                 eval_dataset: str | None = None):
        self.run = run
        self.model = model or load_study_model(cfg)
        batch = planned_batch_size(self.model, cfg)
        self.cfg = dataclasses.replace(cfg, batch_size=batch) if batch != cfg.batch_size else cfg
        self.layer = cfg.layer if cfg.layer is not None else default_layer(self.model.n_layers)
        self.model.validate_layers([self.layer])
        if not cfg.dataset.startswith("toy"):
            raise NotImplementedError("sweeps run on the toy datasets; real datasets: use "
                                      "`lens-steer seal`/`asc` with --traces")
        self.extract_toy, self.eval_toy = toy_splits(
            cfg.model, cfg.n_extract, cfg.n_eval, cfg.extract_seed, cfg.eval_seed,
            cfg.dataset, eval_dataset)
        self.extract_problems = as_eval_problems(self.extract_toy, "extract")
        self.eval_problems = as_eval_problems(self.eval_toy, "eval")

    # -- extraction ----------------------------------------------------------------------------
    @cached_property
    def cache(self):
        """Thought cache (all layers) of the model's own traces on the extraction split."""
        from lens_steer.cache import CacheConfig, cache_thoughts, load_cache

        traces, summary = generate_traces(self.model, self.extract_problems, self.cfg, self.run,
                                          "extract")
        self.extract_summary = summary
        cache_thoughts(self.model, traces, self.run.path / "cache",
                       CacheConfig(layers=None, batch_size=16))
        return load_cache(self.run.path / "cache")

    def seal_vector(self, layer: int | None = None, variant: str | None = None):
        from lens_steer.steering.seal import SealConfig, extract_seal_vector

        cfg = SealConfig(layer=self.layer if layer is None else layer,
                         variant=variant or self.cfg.variant, alpha=self.cfg.alpha)
        return extract_seal_vector(self.cache, config=cfg, model=self.model,
                                   data=f"{self.cfg.dataset} extraction split, "
                                        f"{len(self.extract_problems)} problems")

    def asc_pairs(self) -> list[tuple[str, str, str]]:
        return [(p.prompt, p.verbose_trace, p.concise_trace) for p in self.extract_toy]

    def asc_vector(self, layer: int | None = None):
        """The unit ASC direction at `layer` with its strength: `asc_gamma` when set, else the
        calibrated gamma (cached per layer)."""
        from lens_steer.steering.asc import (
            AscConfig,
            calibrate_gamma,
            extract_asc_vector,
            sample_states,
        )

        layer = self.layer if layer is None else layer
        stage = f"asc-gamma-L{layer}"
        vec = extract_asc_vector(self.model, self.asc_pairs(), AscConfig(layer=layer),
                                 data=f"{len(self.extract_toy)} toy verbose/concise pairs")
        if self.run.done(stage):
            gamma = self.run.result(stage)["gamma"]
        else:
            states = sample_states(self.model, [(p.prompt, p.verbose_trace)
                                                for p in self.extract_toy],
                                   self.cfg.n_calibration, seed=self.cfg.seed)
            cal = calibrate_gamma(self.model, vec, states, epsilon=self.cfg.epsilon,
                                  measure=False)
            gamma = cal.gamma
            self.run.mark_done(stage, {"gamma": gamma, "alpha": cal.alpha, "L": cal.L})
        vec.scale = gamma if self.cfg.asc_gamma is None else self.cfg.asc_gamma
        vec.provenance["gamma_source"] = ("calibrated" if self.cfg.asc_gamma is None
                                          else f"fixed (calibrated: {gamma:.4g})")
        return vec

    def vector(self, layer: int | None = None, variant: str | None = None):
        return (self.seal_vector(layer, variant) if self.cfg.method == "seal"
                else self.asc_vector(layer))

    # -- evaluation ----------------------------------------------------------------------------
    def validation_problems(self, n: int) -> list[Any]:
        """`n` problems disjoint from the extraction and evaluation splits (seed: extraction
        seed + 1), for choosing a strength without touching the evaluation split."""
        used = {p.question for p in self.extract_toy + self.eval_toy}
        return as_eval_problems(validation_split(self.cfg.model, n, self.cfg.extract_seed + 1,
                                                 used), "val")

    def evaluate(self, name: str, interventions: Sequence[Any] = (),
                 problems: Sequence[Any] | None = None, **gen_overrides: Any) -> dict[str, Any]:
        """Summary of greedy generation on the evaluation split, or on `problems` (resumable
        per `name`)."""
        from lens_steer.eval.runner import run_eval

        stage = f"eval-{name}"
        if self.run.done(stage):
            return self.run.result(stage)
        problems = self.eval_problems if problems is None else problems
        records, summary = run_eval(self.model, problems, "toy", template="toy",
                                    config=generation_config(self.cfg, **gen_overrides),
                                    interventions=list(interventions), progress=True)
        self.run.write_records([{"condition": name, **r.to_dict()} for r in records],
                               f"records/{name}.jsonl")
        summary = headline(summary)
        self.run.mark_done(stage, summary)
        return summary


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with reflection + transition per trace added."""
    t = summary.get("thoughts_per_trace") or {}
    return {**summary,
            "reflection_transition_per_trace": (t.get("reflection") or 0) + (t.get("transition")
                                                                              or 0)}


def merge_records(run: RunFolder, names: Sequence[str]) -> None:
    """records.jsonl = every evaluation point's records, tagged by condition."""
    from lens_steer.io import read_jsonl

    rows = []
    for name in names:
        path = run.path / "records" / f"{name}.jsonl"
        if path.exists():
            rows += read_jsonl(path)
    run.write_records(rows)
