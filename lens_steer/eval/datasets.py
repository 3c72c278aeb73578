"""Evaluation datasets (MATH500, GSM8K, toy problems) and per-model-family prompt templates.

MATH500 and GSM8K load from local JSONL in their public formats, or from the Hugging Face hub
when online and the ``datasets`` package is installed. Offline, the hub route fails at once with
an error naming the local-JSONL route (no hang, no retries).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lens_steer.errors import ConfigError, DataError
from lens_steer.eval.answers import extract_answer, is_equiv, numeric_match
from lens_steer.registry import DATASETS
from lens_steer.toy.problems import generate_problems

__all__ = ["Problem", "DatasetUnavailableError", "load_math500", "load_gsm8k", "load_toy",
           "load_dataset", "read_problems_jsonl", "format_prompt", "TEMPLATES", "answer_checker",
           "DATASET_NAMES", "SEAL_PREFIX"]

DATASET_NAMES = ("math500", "gsm8k", "toy")
MATH500_HUB = "HuggingFaceH4/MATH-500"
GSM8K_HUB = "openai/gsm8k"
_ENV_PATHS = {"math500": "LENS_STEER_MATH500_PATH", "gsm8k": "LENS_STEER_GSM8K_PATH"}
_HUB_CONNECT_TIMEOUT_S = 1.5


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be loaded; the message says how to load it another way."""


@dataclass
class Problem:
    """One evaluation problem. `answer` is the gold final answer (GSM8K: the number after ####)."""

    id: str
    question: str
    answer: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- local JSONL

def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (or a JSON list), with the line number in errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); expected JSONL") from e
    if text.lstrip().startswith("["):  # a JSON list (e.g. a .json export)
        try:
            return list(json.loads(text))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from e
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                            "expected one JSON object per line") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got "
                            f"{type(row).__name__}")
        rows.append(row)
    return rows


def _resolve_path(name: str, path: str | os.PathLike | None, split: str) -> Path | None:
    """Explicit path, else $LENS_STEER_<NAME>_PATH; a folder resolves to ``<split>.jsonl``."""
    if path is None:
        env = os.environ.get(_ENV_PATHS.get(name, ""), "")
        if not env:
            return None
        path = env
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / f"{split}.jsonl", p / f"{split}.json", p / "test.jsonl"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"no {split}.jsonl in folder {p}")
    if not p.is_file():
        raise FileNotFoundError(f"{name} file not found: {p}")
    return p


def _require(row: dict[str, Any], keys: tuple[str, ...], where: str, fmt: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; {fmt}")


_MATH_FMT = "MATH500 rows need 'problem' and 'answer' (HuggingFaceH4/MATH-500 format)"
_GSM_FMT = "GSM8K rows need 'question' and 'answer' ending in '#### N' (openai/gsm8k format)"


def _math500_from_rows(rows: Iterable[dict[str, Any]], where: str) -> list[Problem]:
    out = []
    for i, row in enumerate(rows):
        _require(row, ("problem", "answer"), f"{where} row {i}", _MATH_FMT)
        meta = {k: v for k, v in row.items() if k not in ("problem", "answer", "unique_id")}
        out.append(Problem(id=str(row.get("unique_id") or f"math500-{i}"),
                           question=str(row["problem"]), answer=str(row["answer"]).strip(),
                           source="math500", meta=meta))
    return out


def _gsm8k_from_rows(rows: Iterable[dict[str, Any]], where: str, split: str) -> list[Problem]:
    out = []
    for i, row in enumerate(rows):
        _require(row, ("question", "answer"), f"{where} row {i}", _GSM_FMT)
        gold = extract_answer(str(row["answer"]), style="gsm8k")
        if gold is None:
            raise DataError(f"{where} row {i}: answer has no '#### N' line; {_GSM_FMT}")
        meta = {k: v for k, v in row.items() if k not in ("question", "answer", "id")}
        meta["solution"] = str(row["answer"])
        out.append(Problem(id=str(row.get("id") or f"gsm8k-{split}-{i}"),
                           question=str(row["question"]), answer=gold.replace(",", ""),
                           source="gsm8k", meta=meta))
    return out


def read_problems_jsonl(path: str | os.PathLike) -> list[Problem]:
    """Read problems saved with ``Problem.to_dict`` (one JSON object per line)."""
    out = []
    for i, row in enumerate(_read_rows(Path(path))):
        try:
            out.append(Problem(**row))
        except TypeError as e:
            raise DataError(f"{path} row {i + 1}: {e}; rows need id, question, answer, "
                            "source (Problem.to_dict)") from e
    return out


# ----------------------------------------------------------------------------- hub route

def _truthy(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout_s: float = _HUB_CONNECT_TIMEOUT_S) -> bool:
    """A TCP connect to the hub within `timeout_s` (DNS included: done on a daemon thread)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http"
                                                                else 443)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(ok and ok[0])


def _load_hub_rows(repo: str, config: str | None, split: str, local_hint: str
                   ) -> list[dict[str, Any]]:
    """Rows of a hub dataset, or DatasetUnavailableError at once (offline / no `datasets`)."""
    def fail(why: str) -> DatasetUnavailableError:
        return DatasetUnavailableError(
            f"cannot load {repo} from the Hugging Face hub: {why}. Use the local-JSONL route "
            f"instead: {local_hint}")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(var):
            raise fail(f"offline mode is on ({var}=1)")
    try:
        import datasets as hf_datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise fail("the `datasets` package is not installed") from None
    if not _hub_reachable():
        raise fail(f"the hub is unreachable (no connection within {_HUB_CONNECT_TIMEOUT_S} s)")
    try:
        ds = hf_datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with the way out
        raise fail(f"{type(e).__name__}: {e}") from e
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- loaders

def load_math500(path: str | os.PathLike | None = None) -> list[Problem]:
    """MATH500 from a local JSONL (fields `problem`, `answer`; optional `solution`, `subject`,
    `level`, `unique_id`), $LENS_STEER_MATH500_PATH, or the hub (``HuggingFaceH4/MATH-500``)."""
    p = _resolve_path("math500", path, "test")
    if p is not None:
        return _math500_from_rows(_read_rows(p), str(p))
    hint = ("load_math500(path='math500.jsonl') or load_dataset('math500', path=...) or "
            f"${_ENV_PATHS['math500']}; one JSON object per line with fields 'problem' and "
            "'answer' (download HuggingFaceH4/MATH-500 test.jsonl on a connected machine)")
    return _math500_from_rows(_load_hub_rows(MATH500_HUB, None, "test", hint), MATH500_HUB)


def load_gsm8k(path: str | os.PathLike | None = None, split: str = "test") -> list[Problem]:
    """GSM8K from a local JSONL (fields `question`, `answer` ending in ``#### N``),
    $LENS_STEER_GSM8K_PATH (file or folder holding ``<split>.jsonl``), or the hub
    (``openai/gsm8k``, config main). Gold answers are the numbers after ``####``, commas removed."""
    p = _resolve_path("gsm8k", path, split)
    if p is not None:
        return _gsm8k_from_rows(_read_rows(p), str(p), split)
    hint = (f"load_gsm8k(path='gsm8k_{split}.jsonl') or load_dataset('gsm8k', path=...) or "
            f"${_ENV_PATHS['gsm8k']}; one JSON object per line with fields 'question' and "
            "'answer' ending in '#### N' (download openai/gsm8k main on a connected machine)")
    return _gsm8k_from_rows(_load_hub_rows(GSM8K_HUB, "main", split, hint), GSM8K_HUB, split)


def load_toy(n: int = 100, seed: int = 0) -> list[Problem]:
    """`n` toy problems from ``lens_steer.toy.problems.generate_problems(n, seed)``.

    The toy problem's own prompt is kept in ``meta["prompt"]`` (used by the "toy" template).
    """
    out = []
    for i, obj in enumerate(generate_problems(n, seed)):
        meta: dict[str, Any] = {}
        if is_dataclass(obj) and not isinstance(obj, type):
            meta = {k: v for k, v in asdict(obj).items() if k not in ("question", "answer")
                    and isinstance(v, (str, int, float, bool, list, dict, type(None)))}
        meta["prompt"] = str(getattr(obj, "prompt", obj.question))
        out.append(Problem(id=f"toy-{seed}-{i}", question=str(obj.question),
                           answer=str(obj.answer), source="toy", meta=meta))
    return out


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "").replace("_", "")
    aliases = {"math500": "math500", "math": "math500", "gsm8k": "gsm8k", "gsm": "gsm8k",
               "toy": "toy"}
    if key not in aliases:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {list(DATASET_NAMES)}")
    return aliases[key]


def load_dataset(name: str, path: str | os.PathLike | None = None, n: int | None = None,
                 seed: int = 0, split: str = "test") -> list[Problem]:
    """Problems of dataset `name` ("math500", "gsm8k", "toy"); `n` keeps the first n (toy:
    generates n, default 100, with `seed`)."""
    if name in DATASETS and name not in DATASET_NAMES:  # e.g. "livecodebench" (eval.code)
        return DATASETS.get(name)(path=path, n=n, seed=seed, split=split)
    key = _canonical(name)
    if n is not None and n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if key == "toy":
        return load_toy(100 if n is None else n, seed)
    probs = load_math500(path) if key == "math500" else load_gsm8k(path, split)
    return probs if n is None else probs[:n]


def _registered(name: str) -> Callable[..., list[Problem]]:
    def load(path: str | os.PathLike | None = None, n: int | None = None, seed: int = 0,
             split: str = "test") -> list[Problem]:
        return load_dataset(name, path=path, n=n, seed=seed, split=split)

    load.__doc__ = f"{name} problems (`load_dataset({name!r}, ...)`)."
    return load


for _name in DATASET_NAMES:
    DATASETS.register(_name, _registered(_name), overwrite=True)


# ----------------------------------------------------------------------------- prompts

SEAL_PREFIX = ("Answer the following questions. You should think step-by-step and put your "
               "final answer within \\boxed{}.\n")
_BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES: dict[str, str] = {
    "raw": "{problem}",
    "r1": ("<｜begin▁of▁sentence｜><｜User｜>{problem}\n" + _BOXED_INSTRUCTION
           + "<｜Assistant｜><think>\n"),
    "qwen": ("<|im_start|>user\n{problem}\n" + _BOXED_INSTRUCTION
             + "<|im_end|>\n<|im_start|>assistant\n"),
    # SEAL's official prompt (eval_MATH_steering.py) in the R1 chat template with
    # add_generation_prompt: the template's BOS is removed from the text and the tokenizer adds
    # one back, so the ids start with exactly one BOS, spelt here (our encode adds none).
    "seal-r1": ("<｜begin▁of▁sentence｜><｜User｜>" + SEAL_PREFIX + "Question: {problem}"
                "<｜Assistant｜><think>\n"),
    # QwQ-32B-Preview: the prefix as the system message, "Question: ..." as the user's.
    "seal-qwq": ("<|im_start|>system\n" + SEAL_PREFIX + "<|im_end|>\n<|im_start|>user\n"
                 "Question: {problem}<|im_end|>\n<|im_start|>assistant\n"),
    # ASC's generate.py: the bare problem, no chat template; R1 tokenizers add a BOS
    "asc-r1": "<｜begin▁of▁sentence｜>{problem}",
}
"""Named prompt templates; ``{problem}`` is replaced by the question. "toy" is handled apart."""


def format_prompt(problem: Problem | str, template: str = "raw") -> str:
    """The prompt for `problem` under `template`.

    `template`: a name in :data:`TEMPLATES` ("raw", "r1" = DeepSeek-R1-distill chat, "qwen"),
    "toy" (the toy problem's own prompt), or a custom string with ``{problem}`` (alias
    ``{question}``) and optionally ``{id}``. Placeholders are substituted literally, so other
    braces such as ``\\boxed{}`` stay as written.
    """
    question = problem if isinstance(problem, str) else problem.question
    pid = "" if isinstance(problem, str) else problem.id
    if template == "toy":
        prompt = None if isinstance(problem, str) else problem.meta.get("prompt")
        if prompt is None:
            raise ConfigError("template 'toy' needs a toy Problem (meta['prompt']); for other "
                              "datasets pass --template raw, r1 (r1_code for code) or a custom "
                              "'{problem}' string")
        return str(prompt)
    fmt = TEMPLATES.get(template, template)
    if "{problem}" not in fmt and "{question}" not in fmt:
        raise ConfigError(f"unknown template {template!r}: use one of "
                          f"{sorted([*TEMPLATES, 'toy'])} or a string containing '{{problem}}'")
    return fmt.replace("{problem}", question).replace("{question}", question).replace("{id}",
                                                                                      pid)


# ----------------------------------------------------------------------------- checkers

def _toy_check(pred: str | None, gold: str) -> bool:
    return numeric_match(pred, gold) or is_equiv(pred, gold)


def answer_checker(name: str) -> Callable[[str | None, str], bool]:
    """The answer checker for a dataset: GSM8K exact numeric match, MATH500 math equivalence,
    toy numeric-or-equivalent."""
    key = _canonical(name)
    return {"gsm8k": numeric_match, "math500": is_equiv, "toy": _toy_check}[key]
