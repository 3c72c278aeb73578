"""The steering pipeline every study shares: one loaded model, one cache, keyed resumable stages.

    pipe = SteeringPipeline(cfg, run)                 # loads the model, checks the layer
    pipe.cache()                                      # thought cache of the extraction split
    vec = pipe.seal_vector(layer=4, variant="both")
    summary = pipe.evaluate("seal-L4-a1", [vec.intervention(pipe.model, scale=1.0)])

Every evaluation goes through `lens_steer.eval.runner.run_eval` and is a stage of the run folder
keyed by what decides its result (model identity, problems, generation settings, the
interventions' layers / scales / rules / vector contents): an interrupted study resumes where it
stopped, and a re-run with other settings recomputes exactly the stages whose inputs changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from experiments.common import (
    StudyConfig,
    check_layers,
    default_layer,
    planned_batch_size,
    prompts_for,
    steer_sites,
    study_splits,
    traces_from_records,
)
from experiments.run_folder import RunFolder, _jsonable, fingerprint
from lens_steer.errors import ConfigError, DataError
from lens_steer.thoughts import LABELS

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

THOUGHT_TYPES = LABELS


def refl_trans(summary: dict[str, Any]) -> float:
    """Reflection + transition thoughts per trace (the SEAL headline metric), as
    `lens_steer.eval.metrics.summarize` computes it."""
    return summary.get("reflection_transition_per_trace") or 0.0


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with `reflection_transition_per_trace` added."""
    return {**summary, "reflection_transition_per_trace": refl_trans(summary)}


def changes(base: dict[str, Any], steered: dict[str, Any]) -> dict[str, Any]:
    """Steered vs base: accuracy points, % mean tokens, % reflection + transition."""
    def pct(new: float, old: float) -> float | None:
        return None if not old else 100.0 * (new - old) / old

    return {"accuracy_points": 100.0 * (steered["accuracy"] - base["accuracy"]),
            "mean_tokens_pct": pct(steered["mean_tokens"], base["mean_tokens"]),
            "reflection_transition_pct": pct(refl_trans(steered), refl_trans(base))}


def intervention_key(iv: Any) -> dict[str, Any]:
    """What decides an intervention's effect (its vector by content; operation, head, patch
    source and hook only when set, so keys of plain additions stay as they were)."""
    extra = {k: _jsonable(v) if k != "source" else fingerprint(v)
             for k, v in (("op", getattr(iv, "op", "add")), ("head", getattr(iv, "head", None)),
                          ("source", getattr(iv, "source", None)), ("fn", getattr(iv, "fn", None)))
             if v is not None and not (k == "op" and v == "add")}
    return {"layer": getattr(iv, "layer", None), "site": _jsonable(getattr(iv, "site", None)),
            "scale": float(iv.scale), "vector": fingerprint(iv.vector),
            "rule": {"str": str(iv.rule), "fields": _jsonable(iv.rule)}, **extra}



def cache_key(cache: Any) -> str:
    """A thought cache's content (its own input fingerprint and settings), for stage keys of
    what is computed from it."""
    return fingerprint({k: cache.info.get(k) for k in ("fingerprint", "settings")})

class SteeringPipeline:
    def __init__(self, cfg: StudyConfig, run: RunFolder, model: ModelBackend | None = None,
                 eval_dataset: str | None = None, layer: int | None = None):
        self.run = run
        layer = getattr(cfg, "layer", None) if layer is None else layer
        self.model = model or cfg.load()
        if layer is not None:
            check_layers(self.model, [layer])
        # --read-site / --write-site (None = resid_post of the layer), checked before any forward
        layer, self.read_site, self.write_site = steer_sites(self.model, cfg, layer)
        batch = planned_batch_size(self.model, cfg)
        self.cfg = dataclasses.replace(cfg, batch_size=batch) if batch != cfg.batch_size else cfg
        self.layer = layer if layer is not None else default_layer(self.model.n_layers)
        self.splits = study_splits(cfg, eval_dataset)
        self.extract_problems, self.eval_problems = self.splits.extract, self.splits.eval
        self.extract_toy = self.splits.extract_toy
        self.dataset = "toy" if cfg.dataset.startswith("toy") else cfg.dataset
        self._cache: dict[Any, Any] = {}

    # -- keys ----------------------------------------------------------------------------------
    def problems_key(self, problems: Sequence[Any]) -> dict[str, Any]:
        prompts = prompts_for(problems, self.cfg.template)
        return {"n": len(problems), "content": fingerprint(
            [[str(p.id), p.question, str(p.answer), q] for p, q in zip(problems, prompts,
                                                                        strict=True)])}

    def generation_key(self, **overrides: Any) -> dict[str, Any]:
        gen = vars(self.cfg.generation_config(**overrides)).copy()
        gen.pop("batch_size", None)  # a performance knob; greedy results do not depend on it
        return gen

    # -- extraction ----------------------------------------------------------------------------
    def extraction_traces(self, name: str = "extract") -> tuple[list[dict], dict[str, Any]]:
        """The model's own traces on the extraction split (generated once per settings):
        (traces for the cache, generation summary). Writes `<name>_records.jsonl`."""
        from lens_steer.eval.metrics import read_records

        problems = self.extract_problems
        stage, path = f"generate-{name}", self.run.path / f"{name}_records.jsonl"
        key = {"model": self.cfg.identity(), "problems": self.problems_key(problems),
               "generation": self.generation_key(), "dataset": self.dataset}
        if self.run.done(stage, key) and path.exists():
            records, summary = read_records(path), self.run.result(stage)
        else:
            records, summary = self._run_eval(problems, (), {})
            self.run.write_records([r.to_dict() for r in records], path.name)
            self.run.mark_done(stage, summary, key)
        self.extract_summary = summary
        return traces_from_records(problems, prompts_for(problems, self.cfg.template),
                                   records), summary

    def cache(self, traces: Sequence[dict] | None = None, layers: Sequence[int] | None = None,
              name: str = "cache", sites: Sequence[str] | None = None, think_only: bool = True,
              labeler: str = "seal"):
        """Thought cache of `traces` (default: the model's extraction traces) at `layers`
        (default all), or at `sites` (hook names) instead; `think_only=False` counts the whole
        trace as thinking. The cache fingerprints its own inputs: same inputs resume, others
        replace it. `labeler`: a name in `lens_steer.registry.LABELLERS`."""
        from lens_steer.cache import CacheConfig, cache_thoughts, load_cache

        key = (name, None if layers is None else tuple(layers), traces is None,
               None if sites is None else tuple(sites), think_only, labeler)
        if key not in self._cache:
            if traces is None:
                traces, _ = self.extraction_traces()
            where = ({"sites": list(sites)} if sites is not None else
                     {"layers": None if layers is None else list(layers)})
            summary = cache_thoughts(self.model, traces, self.run.path / name,
                                     CacheConfig(**where, batch_size=16, progress=False,
                                                 think_only=think_only, labeler=labeler),
                                     overwrite=True)
            if summary.n_thoughts == 0:
                raise DataError(f"the {summary.n_traces} extraction traces hold no thought (no "
                                "delimiter inside <think>): raise --max-new-tokens, check "
                                "--template, or pass --traces FILE")
            if summary.n_without_thoughts:
                print(f"[cache] warning: {summary.n_without_thoughts} of {summary.n_traces} "
                      "traces hold no thought", flush=True)
            self._cache[key] = load_cache(self.run.path / name)
        return self._cache[key]

    def seal_vector(self, layer: int | None = None, variant: str | None = None, cache=None,
                    data: Any = None):
        from lens_steer.steering.seal import SealConfig, extract_seal_vector

        cfg = SealConfig(layer=self.layer if layer is None else layer,
                         variant=variant or getattr(self.cfg, "variant", "both"),
                         alpha=getattr(self.cfg, "alpha", 1.0))
        sites = ({"read_site": self.read_site, "write_site": self.write_site}
                 if cfg.layer == self.layer else {})
        return extract_seal_vector(cache if cache is not None else self.cache(), config=cfg,
                                   model=self.model, **sites,
                                   data=data or f"{self.cfg.dataset} extraction split, "
                                                f"{len(self.extract_problems)} problems")

    def asc_pairs(self) -> list[tuple[str, str, str]]:
        if not self.extract_toy:
            raise ConfigError("ASC pairs (verbose, concise) come from toy problems: use a toy "
                              "--dataset")
        return [(p.prompt, p.verbose_trace, p.concise_trace) for p in self.extract_toy]

    def asc_direction(self, layer: int | None = None, raw: bool = False, **asc_options: Any):
        """The unit ASC direction at `layer` (scale 1) from the extraction split's pairs (at the
        config's read / write sites for the study's layer; `raw`: not normalised)."""
        from lens_steer.steering.asc import AscConfig, extract_asc_vector

        layer = self.layer if layer is None else layer
        sites = {"read_site": self.read_site, "write_site": self.write_site,
                 "raw": raw} if layer == self.layer else {"raw": raw}
        return extract_asc_vector(self.model, self.asc_pairs(),
                                  AscConfig(layer=layer, **asc_options),
                                  data=f"{len(self.extract_toy)} toy verbose/concise pairs",
                                  **sites)

    def asc_calibration(self, vec, measure: bool = False) -> dict[str, Any]:
        """KL-bound gamma of `vec` over `n_calibration` states of extraction traces (stored
        per vector and settings)."""
        from lens_steer.steering.asc import calibrate_gamma, sample_states

        n, eps = self.cfg.n_calibration, self.cfg.epsilon
        key = {"model": self.cfg.identity(), "vector": fingerprint(vec.vector),
               "layer": vec.layer, "n_calibration": n, "epsilon": eps, "seed": self.cfg.seed,
               "pairs": fingerprint(self.asc_pairs()), "measure": measure}

        def compute() -> dict[str, Any]:
            states = sample_states(self.model, [(p.prompt, p.verbose_trace)
                                                for p in self.extract_toy], n, seed=self.cfg.seed)
            cal = calibrate_gamma(self.model, vec, states, epsilon=eps, measure=measure)
            return {"gamma": cal.gamma, "alpha": cal.alpha, "L": cal.L,
                    **({"full": cal.to_dict()} if measure else {})}

        return self.run.cached(f"asc-calibration-L{vec.layer}", key, compute)

    def asc_vector(self, layer: int | None = None):
        """The ASC direction at `layer` with its strength: `asc_gamma` when set, else the
        calibrated gamma."""
        vec = self.asc_direction(layer)
        gamma = self.asc_calibration(vec)["gamma"]
        fixed = getattr(self.cfg, "asc_gamma", None)
        vec.scale = gamma if fixed is None else fixed
        vec.provenance["gamma_source"] = ("calibrated" if fixed is None
                                          else f"fixed (calibrated: {gamma:.4g})")
        return vec

    def vector(self, layer: int | None = None, variant: str | None = None):
        return (self.seal_vector(layer, variant) if self.cfg.method == "seal"
                else self.asc_vector(layer))

    # -- evaluation ----------------------------------------------------------------------------
    def validation_problems(self, n: int | None = None) -> list[Any]:
        """Problems disjoint from the extraction and held-out splits (see `Splits`)."""
        return self.splits.validation(n)

    def _run_eval(self, problems, interventions, gen_overrides):
        from lens_steer.eval.runner import run_eval

        return run_eval(self.model, problems, self.dataset, template=self.cfg.template,
                        config=self.cfg.generation_config(**gen_overrides),
                        interventions=list(interventions), progress=True)

    def evaluate(self, name: str, interventions: Sequence[Any] = (),
                 problems: Sequence[Any] | None = None, **gen_overrides: Any) -> dict[str, Any]:
        """Summary (with `reflection_transition_per_trace`) of generation on the held-out
        split, or on `problems`; stored as stage `eval-<name>` with its key."""
        problems = self.eval_problems if problems is None else problems
        key = {"model": self.cfg.identity(), "problems": self.problems_key(problems),
               "dataset": self.dataset, "generation": self.generation_key(**gen_overrides),
               "interventions": [intervention_key(iv) for iv in interventions]}

        def compute() -> dict[str, Any]:
            records, summary = self._run_eval(problems, interventions, gen_overrides)
            self.run.write_records([{"condition": name, **r.to_dict()} for r in records],
                                   f"records/{name}.jsonl")
            return headline(summary)

        return self.run.cached(f"eval-{name}", key, compute,
                               outputs=[self.run.path / "records" / f"{name}.jsonl"])

    def validation_grid(self, vec, gammas: Sequence[float], margin: float,
                        ) -> tuple[dict[str, Any], dict[float, dict[str, Any]], float | None]:
        """ASC strengths on the validation split: (base, {gamma: summary}, the gamma with the
        shortest traces within `margin` accuracy points of base, or None)."""
        from lens_steer.steering import select_gamma

        val = self.validation_problems()
        vbase = self.evaluate("val-base", problems=val)
        grid = {g: self.evaluate(f"val-asc-g{g:g}", [vec.intervention(self.model, scale=g)],
                                 problems=val) for g in gammas}
        return vbase, grid, select_gamma(vbase, grid, margin)


def merge_records(run: RunFolder, names: Sequence[str]) -> None:
    """records.jsonl = every evaluation point's records, tagged by condition."""
    from lens_steer.io import read_jsonl

    rows = []
    for name in names:
        path = run.path / "records" / f"{name}.jsonl"
        if path.exists():
            rows += read_jsonl(path)
    run.write_records(rows)
