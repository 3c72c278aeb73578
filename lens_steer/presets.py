"""Presets: each paper's real-model setting, as its official code runs it, by name.

    p = get_preset("seal-r1-distill-qwen-7b")              # faithful to the official code
    p = get_preset("seal-r1-distill-qwen-7b", "corrected")  # or "seal-r1-distill-qwen-7b:corrected"
    p.read_site, p.write_site, p.sign, p.strength           # where, which way, how much
    p.format_prompt(question); p.generation_config(); p.grading()
    p.intervention(model, vector)                            # the steering edit
    p.overrides                                              # config defaults for `--preset`

Sources (checked against the code, not the papers' prose). SEAL: VITA-Group/SEAL, initial commit
(mirrored by Zemelee/SEAL): `eval_MATH_steering.py` (prompt, chat template, BOS, greedy,
fp32 HF weights, steering), `modeling_utils/modeling_qwen2.py` (steer `hidden_states` entering
decoder layer L = `blocks.L.hook_resid_pre`, last position, when the newest token is a `\\n\\n`
token inside `<think>`), `hidden_analysis.py` (labels, segments, `hidden_states[L]`),
`vector_generation.py` (vector = mean(reflection ∪ transition) − mean(execution)),
`scripts/*.sh` (layer 20, coefficient −1, 500 + 500 traces, 10,000 tokens for MATH-500).
ASC: ArminAzizi98/ASC: `generate.py` (gamma, layer, subtract at the output of `model.layers[L]`
= `blocks.L.hook_resid_post`, last position, temperature 0.7, repetition penalty 1.1, 8,192
tokens, dtype "auto" = bf16, no chat template), `extract_steering_vector.py` (`hidden_states[L]` =
`blocks.L.hook_resid_pre`, concise − verbose, raw mean), `generate_long_cots.py` (verbose pairs),
`vectors/*.pt` (released; norms 249 / 14.5 / 336).

Faithful presets reproduce the code, oddities included (ASC reads `resid_pre` L but writes
`resid_post` L, and subtracts concise − verbose, i.e. pushes toward verbose as written; SEAL's
labeller keeps its typo). `corrected` gives the clean variant: the corrected labeller, reading
and writing the same site, and ASC adding +gamma·v along concise − verbose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lens_steer.errors import ConfigError

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

__all__ = ["Preset", "PRESETS", "get_preset", "MODES", "preset_names"]

MODES: tuple[str, ...] = ("faithful", "corrected")


@dataclass(frozen=True)
class Preset:
    """One paper's setting on one model. `sources` says where each setting comes from."""

    name: str
    method: str
    """"seal" or "asc"."""
    hub_id: str
    arch: str
    """Architecture family of the checkpoint ("qwen2" or "llama")."""
    n_layers: int
    d_model: int
    read_site: str
    """Where the vector's activations are read."""
    write_site: str
    """Where generation adds sign·strength·vector."""
    vector: str
    """What the stored vector is."""
    sign: float
    strength: float
    """SEAL's |coefficient| / ASC's gamma (applied as sign·strength·vector)."""
    position_rule: str
    """"think_delimiter" (SEAL: newest token is a `\\n\\n` token in the think region) or
    "newest" (ASC: the last position of every forward step)."""
    region: str
    """Think region for SEAL's rule and segmentation: "think" or "all" (whole generation)."""
    template: str
    """Prompt template name in `lens_steer.eval.datasets.TEMPLATES`."""
    chat_template: bool
    bos: str
    """How the official ids begin (our `encode` adds no special tokens; templates spell it)."""
    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    dtype: str = "float32"
    extract_dataset: str = "MATH train"
    n_extract: int = 0
    """SEAL: traces per class (correct and incorrect); ASC: pairs."""
    selection: str = "first"
    """`lens_steer.traces.select_traces` rule for the extraction traces."""
    extract_max_new_tokens: int | None = None
    labeller: str = "seal-official"
    grading: str = "official"
    eval_dataset: str = "math500"
    released_vector: str | None = None
    """File in the official repository holding the released vector (ASC)."""
    mode: str = "faithful"
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        return int(self.write_site.split(".")[1])

    def format_prompt(self, question: str) -> str:
        """The official prompt for `question` (stripped, as the official code does)."""
        from lens_steer.eval.datasets import format_prompt  # noqa: PLC0415

        return format_prompt(question.strip(), self.template)

    def generation_config(self, **overrides: Any) -> Any:
        """The official decoding as a `GenerationConfig` (temperature 0 = greedy)."""
        from lens_steer.generation import GenerationConfig  # noqa: PLC0415

        return GenerationConfig(**{"max_new_tokens": self.max_new_tokens,
                                   "temperature": self.temperature, "top_p": self.top_p,
                                   "repetition_penalty": self.repetition_penalty, **overrides})

    def grading_config(self) -> Any:
        from lens_steer.eval.grading import Grading  # noqa: PLC0415

        return Grading(self.grading, "wrong")

    def rule(self, model: ModelBackend) -> Any:
        """The position rule on `model`'s tokenizer."""
        from lens_steer.interventions import NewestPosition  # noqa: PLC0415
        from lens_steer.steering.vector import think_delimiter_rule  # noqa: PLC0415

        if self.position_rule == "newest":
            return NewestPosition()
        return think_delimiter_rule(model.tokenizer, self.region)

    def intervention(self, model: ModelBackend, vector: Any, strength: float | None = None) -> Any:
        """sign·strength·`vector` at `write_site` under the preset's position rule."""
        from lens_steer.interventions import Intervention  # noqa: PLC0415

        vec = getattr(vector, "vector", vector)
        return Intervention(site=self.write_site, vector=vec, rule=self.rule(model),
                            scale=self.sign * (self.strength if strength is None else strength))

    @property
    def overrides(self) -> dict[str, Any]:
        """Defaults for the `seal` / `asc` commands (`--preset NAME`): the preset's read and
        write sites (`read_site` / `write_site`; the write site's block is the steered layer, so
        `--layer` is not set: give `--write-site` / `--read-site` to move them), SEAL's think
        region, ASC's raw vector with gamma = sign·strength (so the command adds -gamma·v at
        resid_post L after reading resid_pre L, as the official code)."""
        out: dict[str, Any] = {"model": self.hub_id, "dtype": self.dtype, "dataset": "math500",
                               "template": self.template, "max_new_tokens": self.max_new_tokens,
                               "read_site": self.read_site,
                               "write_site": self.write_site}
        if self.method == "seal":
            # the command's vector is execution - (reflection ∪ transition): the official
            # -1 × (reflection ∪ transition - execution) is alpha = +strength
            out.update(alpha=self.strength, variant="both", think_region=self.region,
                       labeller=self.labeller, trace_selection=self.selection,
                       traces_per_class=self.n_extract or None)
        else:
            # the official vector is raw (not normalised) and the whole last-token state of
            # problem + completion; gamma multiplies it with the preset's sign; no grid
            out.update(asc_gamma=self.sign * self.strength, asc_vector="raw", trace_end="full",
                       gamma_grid=[])
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def corrected(self) -> Preset:
        """The clean variant (see the module docstring)."""
        if self.mode == "corrected":
            return self
        if self.method == "seal":
            changes: dict[str, Any] = dict(
                labeller="seal", vector="mean(execution) - mean(reflection ∪ transition)",
                sign=1.0, region="auto", grading="lenient")
        else:
            changes = dict(read_site=self.write_site, sign=1.0, grading="lenient",
                           vector="mean(concise - verbose) at the write site, raw")
        note = {"mode": "corrected: " + ", ".join(sorted(changes))}
        return replace(self, mode="corrected", sources={**self.sources, **note}, **changes)


_RELEASED_NORMS = {"deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 249.0,
                   "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": 14.49,
                   "Qwen/QwQ-32B": 336.2}
"""‖mean‖ of the released ASC vectors (measured on the repository's vectors/*.pt)."""


_SEAL_SOURCES = {
    "hub_id": "scripts/*.sh --model_name_or_path (paper: R1-Distill-Qwen-1.5B/7B, QwQ-32B-Preview)",
    "read_site": "hidden_analysis.py reads output.hidden_states[L] = input of decoder layer L",
    "write_site": "modeling_qwen2.py adds to hidden_states before decoder layer L",
    "vector": "vector_generation.py: cat(reflection, transition).mean - execution.mean",
    "sign": "scripts/steering.sh --steering_coef -1.0",
    "strength": "scripts/steering.sh --steering_coef -1.0 (|coef| = 1)",
    "position_rule": "modeling_qwen2.py: last position, newest token in the ĊĊ ids, think flag on",
    "template": "eval_MATH_steering.py prefix + 'Question: ' + question in apply_chat_template",
    "bos": "--remove_bos strips the template's BOS text; the tokenizer call adds one back",
    "max_new_tokens": "scripts/baseline.sh --max_tokens 10000 (MATH-500)",
    "temperature": "eval_MATH_steering.py do_sample=False; eval_MATH_vllm.py temperature=0",
    "dtype": "eval_MATH_steering.py from_pretrained without torch_dtype: fp32 (vLLM traces: "
             "its 'auto', the checkpoint's bf16)",
    "n_extract": "scripts/generate_vector.sh --sample 500 per type (correct, incorrect)",
    "selection": "hidden_analysis.py data[start:start+sample]: the first 500 of each",
    "extract_max_new_tokens": "scripts/generate_vector.sh eval_MATH_vllm.py --max_tokens 1500",
    "labeller": "hidden_analysis.py generate_index (typo 'think differenly', plain prefix)",
    "grading": "get_math_results.py: last \\boxed{} (Qwen-Math extract_answer) + math_equal",
}
_SEAL_LAYER_NOTE = "paper: layer 20 for R1-Distill-Qwen-1.5B/7B, 55 for QwQ-32B-Preview"


def _seal(name: str, hub: str, n_layers: int, d_model: int, layer: int, template: str,
          region: str, **extra: Any) -> Preset:
    return Preset(
        name=name, method="seal", hub_id=hub, arch="qwen2", n_layers=n_layers, d_model=d_model,
        read_site=f"blocks.{layer}.hook_resid_pre", write_site=f"blocks.{layer}.hook_resid_pre",
        vector="mean(reflection ∪ transition) - mean(execution)", sign=-1.0, strength=1.0,
        position_rule="think_delimiter", region=region, template=template, chat_template=True,
        bos=extra.pop("bos", "one BOS (the template's, re-added by the tokenizer)"),
        max_new_tokens=10_000, temperature=0.0, dtype="float32", n_extract=500,
        selection="first", extract_max_new_tokens=1500,
        sources={**_SEAL_SOURCES, "layer": _SEAL_LAYER_NOTE, **extra.pop("sources", {})},
        **extra)


_ASC_SOURCES = {
    "hub_id": "generate.py model_name_to_gamma keys",
    "read_site": "extract_steering_vector.py out.hidden_states[L] (input of decoder layer L)",
    "write_site": "generate.py register_forward_hook on model.model.layers[L] (its output)",
    "vector": "extract_steering_vector.py act(problem+short) - act(problem+long); "
              "generate.py .mean(dim=0), not normalised",
    "sign": "generate.py output - gamma * steering_vec",
    "strength": "generate.py model_name_to_gamma",
    "position_rule": "generate.py edits output[0][:, -1, :] on every forward",
    "template": "generate.py tokenizer(args.problem): the bare problem, no chat template",
    "bos": "the tokenizer's default special tokens",
    "max_new_tokens": "generate.py max_new_tokens=8192",
    "temperature": "generate.py temperature=0.7 (sampling per the model's generation_config)",
    "repetition_penalty": "generate.py repetition_penalty=1.1",
    "dtype": "generate.py torch_dtype='auto' (bf16 checkpoints)",
    "n_extract": "generate_short_cots.py N_QUESTIONS=100 (released files hold 75 / 69 / 60 pairs)",
    "selection": "generate_short_cots.py: 100 MATH-train problems shuffled with seed 42",
    "extract_max_new_tokens": "generate_long_cots.py MAX_TOKENS=4096, temperature 0.3, "
                              "repetition_penalty 1.2, prompt + \" Let's think step by step.\\n\"",
    "labeller": "not used by ASC",
    "grading": "paper: MATH500 / GSM8K accuracy (no grader in the repository); last box",
}


def _asc(name: str, hub: str, arch: str, n_layers: int, d_model: int, layer: int, gamma: float,
         template: str, bos: str, released: str) -> Preset:
    return Preset(
        name=name, method="asc", hub_id=hub, arch=arch, n_layers=n_layers, d_model=d_model,
        read_site=f"blocks.{layer}.hook_resid_pre", write_site=f"blocks.{layer}.hook_resid_post",
        vector="mean over pairs of concise - verbose last-token states, raw", sign=-1.0,
        strength=gamma, position_rule="newest", region="all", template=template,
        chat_template=False, bos=bos, max_new_tokens=8192, temperature=0.7,
        repetition_penalty=1.1, dtype="bfloat16", n_extract=100, selection="all",
        extract_max_new_tokens=4096, labeller="seal", grading="official",
        released_vector=released, sources=dict(_ASC_SOURCES))


PRESETS: dict[str, Preset] = {p.name: p for p in (
    _seal("seal-r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 28, 1536, 20,
          "seal-r1", "think"),
    _seal("seal-r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 28, 3584, 20,
          "seal-r1", "think"),
    _seal("seal-qwq-32b-preview", "Qwen/QwQ-32B-Preview", 64, 5120, 55, "seal-qwq", "all",
          bos="none (Qwen tokenizers have no BOS)",
          sources={"region": "no <think> token: hidden_analysis.py think_only=False (only "
                             "'deepseek' models think_only); steering counts every delimiter",
                   "template": "eval_MATH_steering.py non-deepseek: prefix as the system "
                               "message, 'Question: ...' as the user's"}),
    _asc("asc-r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen2", 28, 3584,
         20, 0.27, "asc-r1", "one BOS (R1 tokenizers add it)", "vectors/steering_vectors_qwen7b.pt"),
    _asc("asc-r1-distill-llama-8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama", 32,
         4096, 20, 0.46, "asc-r1", "one BOS (R1 tokenizers add it)",
         "vectors/steering_vectors_llama8b.pt"),
    _asc("asc-qwq-32b", "Qwen/QwQ-32B", "qwen2", 64, 5120, 57, 0.5, "raw",
         "none (Qwen tokenizers have no BOS)", "vectors/steering_vectors_qwq32b.pt"),
)}
"""Every preset by name (faithful mode); `get_preset(name, "corrected")` for the clean one."""


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, mode: str | None = None) -> Preset:
    """The preset `name` ("NAME" or "NAME:corrected") in `mode` ("faithful" default)."""
    base, _, suffix = name.partition(":")
    mode = mode or suffix or "faithful"
    if mode not in MODES:
        raise ConfigError(f"unknown preset mode {mode!r}; choose one of {list(MODES)}")
    if base not in PRESETS:
        raise ConfigError(f"unknown preset {base!r}; choose one of {preset_names()} (append "
                          "':corrected' for the clean variant)")
    p = PRESETS[base]
    return p.corrected() if mode == "corrected" else p
