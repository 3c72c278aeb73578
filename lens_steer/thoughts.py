"""Thoughts: segment a reasoning trace at `\\n\\n` delimiter tokens and label each segment.

A *delimiter* is any token whose decoded text contains `\\n\\n`. Byte-level BPE tokenizers
(Qwen2, Llama 3) merge the blank line with punctuation (`.\\n\\n`, ` \\n\\n`), so the rule works
on token ids, never on re-tokenised text. Thought j is the text between delimiter j and
delimiter j+1; its *position* is the delimiter token that opens it (SEAL reads and steers the
residual stream there). Only the region inside `<think>`...`</think>` counts when the trace has
one; the paragraph before the first delimiter of a region gets no label. Whitespace-only
segments (two delimiters in a row) are skipped.

Labels follow SEAL (Chen et al., 2025): reflection is tested first, then transition, and
everything else is execution. `LabelRules` makes the keywords and the order configurable, and any
callable `text -> label` (e.g. an LLM labeller) can replace `label_thought`.

    thoughts = segment_thoughts(ids, tokenizer)          # [Thought(index=0, position=12, ...)]
    thought_stats(thoughts)  # {"n_thoughts": 4, "counts": {...}, "tokens": {...}, ...}

Over 400 lines: the token-level and text-level segmentations and both labellers (corrected and
official) must stay side by side to stay consistent.
"""

from __future__ import annotations

import re
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from lens_steer.errors import ConfigError, DataError
from lens_steer.registry import LABELLERS

LABELS: tuple[str, ...] = ("execution", "reflection", "transition")
DELIMITER = "\n\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

Labeler = Callable[[str], str]


# -- labels ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelRules:
    """Keyword rules for thought labels; matching is case-insensitive.

    A label matches when the stripped thought starts with one of its start words (as a whole
    word: "Wait," and "wait." match, "Waiting" does not) or contains one of its keywords.
    Labels are tried in `order`; the first match wins, else `default`.
    """

    reflection_starts: tuple[str, ...] = ("wait",)
    """Start words that make a thought a reflection."""
    reflection_keywords: tuple[str, ...] = (
        "verify", "make sure", "hold on", "think again", "'s correct", "'s incorrect",
        "let me check", "seems right")
    """Substrings that make a thought a reflection."""
    transition_starts: tuple[str, ...] = ("alternatively",)
    """Start words that make a thought a transition."""
    transition_keywords: tuple[str, ...] = (
        "think differently", "another way", "another approach", "another method",
        "another solution", "another strategy", "another technique")
    """Substrings that make a thought a transition."""
    order: tuple[str, ...] = ("reflection", "transition")
    """Labels tested first to last (SEAL: reflection before transition)."""
    default: str = "execution"
    """Label when no rule matches."""

    def __post_init__(self) -> None:
        unknown = [label for label in self.order if label not in ("reflection", "transition")]
        if unknown:
            raise ValueError(f"unknown label(s) {unknown} in LabelRules.order; use 'reflection' "
                             "and/or 'transition' (pass a callable labeler for other labels)")

    def rules_for(self, label: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(start words, keywords) of `label`, lower-cased."""
        starts, keywords = {
            "reflection": (self.reflection_starts, self.reflection_keywords),
            "transition": (self.transition_starts, self.transition_keywords),
        }[label]
        return tuple(s.lower() for s in starts), tuple(k.lower() for k in keywords)

    def __call__(self, text: str) -> str:
        return label_thought(text, self)


SEAL_RULES = LabelRules()


def _normalise(text: str) -> str:
    # curly apostrophes ("that’s correct") count as straight ones
    return text.strip().lower().replace("\u2019", "'").replace("\u2018", "'")


def _starts_with_word(text: str, word: str) -> bool:
    return text.startswith(word) and (len(text) == len(word) or not text[len(word)].isalnum())


def label_thought(text: str, rules: LabelRules = SEAL_RULES) -> str:
    """SEAL label of one thought: "reflection", "transition" or "execution" (by `rules`)."""
    norm = _normalise(text)
    for label in rules.order:
        starts, keywords = rules.rules_for(label)
        if any(_starts_with_word(norm, s) for s in starts) or any(k in norm for k in keywords):
            return label
    return rules.default


_OFFICIAL_CHECK_WORDS = ("verify", "make sure", "hold on", "think again", "'s correct",
                         "'s incorrect", "let me check", "seems right")
_OFFICIAL_SWITCH_WORDS = ("think differenly", "another way", "another approach", "another method",
                          "another solution", "another strategy", "another technique")


def label_thought_official(text: str) -> str:
    """SEAL's labels exactly as the official code (hidden_analysis.py) computes them.

    Differences from `label_thought`: the transition keyword keeps the code's typo "think
    differenly" (so "think differently" is not a transition), "wait"/"alternatively" are plain
    prefixes ("Waiting" is a reflection), only spaces then newlines are stripped, and curly
    apostrophes are not unified. `keep_empty`: `segment_thoughts` keeps empty segments (two
    delimiters in a row), which the official code labels execution.
    """
    step = text.strip(" ").strip("\n").lower()
    if step.startswith("wait") or any(w in step for w in _OFFICIAL_CHECK_WORDS):
        return "reflection"
    if step.startswith("alternatively") or any(w in step for w in _OFFICIAL_SWITCH_WORDS):
        return "transition"
    return "execution"


label_thought_official.keep_empty = True  # type: ignore[attr-defined]
label_thought_official.official_text = True  # type: ignore[attr-defined]

LABELLERS.register("seal", label_thought, overwrite=True)
LABELLERS.register("seal-official", label_thought_official, overwrite=True)


class _RegistryAlias(MutableMapping):
    """`LABELERS[name]` / `name in LABELERS` / `LABELERS[name] = f`: the LABELLERS registry."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> Labeler:
        if name not in self._registry:
            raise KeyError(name)
        return self._registry.get(name)

    def __setitem__(self, name: str, labeler: Labeler) -> None:
        self._registry.register(name, labeler, overwrite=True)

    def __delitem__(self, name: str) -> None:
        self._registry.unregister(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names())

    def __len__(self) -> int:
        return len(self._registry)


LABELERS: MutableMapping[str, Labeler] = _RegistryAlias(LABELLERS)
"""Alias of `lens_steer.registry.LABELLERS` (what `CacheConfig.labeler` and the CLI name)."""


def resolve_labeler(labeler: str | LabelRules | Labeler | None) -> Labeler:
    """A callable `text -> label` from a name in `LABELLERS`, a `LabelRules`, or a callable."""
    if labeler is None:
        return label_thought
    if isinstance(labeler, str):
        return LABELLERS.get(labeler)
    if callable(labeler):
        return labeler
    raise TypeError(f"labeler must be a name, LabelRules or callable, not {type(labeler)}")


def count_by_label(labels: Iterable[str]) -> dict[str, int]:
    """How many of each label; always has the three SEAL keys (0 when absent)."""
    counts = Counter(labels)
    return {**{label: counts.get(label, 0) for label in LABELS},
            **{k: v for k, v in counts.items() if k not in LABELS}}


# -- delimiter and think tokens ---------------------------------------------------------------
def is_delimiter_token(text: str) -> bool:
    """True iff a token's decoded text contains a blank line (`\\n\\n`)."""
    return DELIMITER in text


def _tok(tokenizer: Any) -> Any:
    """Accept a backend (anything with `.tokenizer`) where a tokenizer is expected."""
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "decode") else tokenizer


_TOKEN_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _TokenInfo:
    delimiters: frozenset[int]
    think_open: int | None
    think_close: int | None


def _vocab_size(tok: Any) -> int:
    try:
        return len(tok)
    except TypeError:
        return tok.get_vocab_size()


def _token_info(tokenizer: Any) -> _TokenInfo:
    tok = _tok(tokenizer)
    n = _vocab_size(tok)
    try:
        cached = _TOKEN_INFO.get(tok)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == n:  # tokens added since: recompute
        return cached[1]
    singles = [[i] for i in range(n)]
    backend = getattr(tok, "backend_tokenizer", None)  # Rust decode: ~0.3 s for 150k tokens
    if backend is not None:
        texts = backend.decode_batch(singles, skip_special_tokens=False)
    elif hasattr(tok, "batch_decode"):
        texts = tok.batch_decode(singles)
    else:
        texts = [tok.decode(ids) for ids in singles]
    delimiters = frozenset(i for i, t in enumerate(texts) if is_delimiter_token(t))
    info = _TokenInfo(delimiters, _single_token_id(tok, THINK_OPEN, texts),
                      _single_token_id(tok, THINK_CLOSE, texts))
    try:
        _TOKEN_INFO[tok] = (n, info)
    except TypeError:
        pass
    return info


def _single_token_id(tok: Any, text: str, texts: Sequence[str]) -> int | None:
    """The id of the one token spelling `text`, or None when the vocabulary has none."""
    convert = getattr(tok, "convert_tokens_to_ids", None) or getattr(tok, "token_to_id", None)
    i = convert(text) if convert else None
    if isinstance(i, int) and 0 <= i < len(texts) and texts[i] == text:
        return i
    return None


def delimiter_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every token whose text contains `\\n\\n` (cached per tokenizer and vocabulary
    size, so tokens added later are seen)."""
    ids = _token_info(tokenizer).delimiters
    if not ids:
        raise ValueError(
            "the tokenizer has no token whose text contains '\\n\\n', so traces cannot be split "
            "into thoughts: use the model's byte-level BPE tokenizer (Qwen2/Llama-3 style), or "
            "train one with lens_steer.tokenization.train_bpe_tokenizer on text with blank lines")
    return ids


def think_token_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """Ids of `<think>` and `</think>` when each is a single token, else None."""
    info = _token_info(tokenizer)
    return info.think_open, info.think_close


REGIONS: tuple[str, ...] = ("think", "all", "auto")
"""Where SEAL steers: "think" (delimiters inside `<think>`), "all" (every delimiter of the
generation: the whole generation counts as thinking, as the official code does for
QwQ-32B-Preview, whose tokenizer has no `<think>` token), "auto" ("think" when the tokenizer
has a single `<think>` token, else "all")."""


def think_region_predicate(tokenizer: Any, region: str = "think"
                           ) -> Callable[[Sequence[int]], bool]:
    """Predicate for SEAL steering: the newest token is a delimiter inside `<think>`.

    Inside means an opened `<think>` not yet closed by `</think>`. The delimiter test is a set
    lookup; only at a delimiter (about one token in fifty) does it scan back for the newest
    think/unthink id, so the cost per generated token stays small. `region` (see `REGIONS`):
    "all" accepts every delimiter, for models that do not think inside `<think>`.
    """
    if region not in REGIONS:
        raise ConfigError(f"unknown region {region!r}; choose one of {list(REGIONS)}")
    delimiters = delimiter_token_ids(tokenizer)
    open_id, close_id = think_token_ids(tokenizer)
    if region == "auto":
        region = "think" if open_id is not None else "all"
    if region == "all":
        return lambda ids: bool(len(ids)) and int(ids[-1]) in delimiters
    if open_id is None:
        raise ConfigError(
            "the tokenizer has no single `<think>` token, so the think region cannot be tracked "
            "by id: add it as a special token (additional_special_tokens=['<think>', '</think>'])"
            ", or count the whole generation as thinking (region='all', as the official SEAL "
            "code does for QwQ-32B-Preview; the seal-qwq-32b-preview preset does this)")

    def predicate(ids: Sequence[int]) -> bool:
        if not len(ids) or int(ids[-1]) not in delimiters:
            return False
        for i in range(len(ids) - 2, -1, -1):
            t = ids[i]
            if t == open_id:
                return True
            if t == close_id:
                return False
        return False

    return predicate


# -- segmentation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thought:
    """One thought of a trace; token indices count the trace's real tokens from 0."""

    index: int
    """Order within the trace (0 = first labelled thought)."""
    position: int
    """Token index of the delimiter that opens this thought (where activations are read)."""
    start: int
    """First token of the thought's text (position + 1)."""
    end: int
    """One past its last token: the next delimiter (inclusive) or the end of the region."""
    text: str
    """Decoded text, stripped, without the delimiters' blank lines."""
    label: str
    n_tokens: int
    """end - start."""


def _regions(marks: Sequence[tuple[int, int, bool]], n: int) -> list[tuple[int, int]]:
    """[start, end) spans inside <think>...</think> of a sequence of length `n`, from its think
    marks (start, end, is_open) in order; the whole sequence when it has no mark.

    A `</think>` with no earlier `<think>` (the chat template put it in the prompt) closes a
    region that starts at 0; an unclosed `<think>` runs to the end (a truncated trace). Shared by
    the token rule (marks are tokens) and the text rule (marks are substrings).
    """
    if not marks:
        return [(0, n)]
    opens = [m for m in marks if m[2]]
    closes = [m for m in marks if not m[2]]
    inside = not opens or (bool(closes) and closes[0][0] < opens[0][0])
    regions, start = [], 0
    for lo, hi, is_open in marks:
        if is_open and not inside:
            inside, start = True, hi
        elif not is_open and inside:
            inside = False
            regions.append((start, lo))
    if inside:
        regions.append((start, n))
    return regions


def counted_regions(token_ids: Sequence[int], tokenizer: Any, *, think_only: bool = True
                    ) -> list[tuple[int, int]]:
    """[start, end) token spans where thoughts are looked for (see `segment_thoughts`)."""
    ids = [int(i) for i in token_ids]
    if not think_only:
        return [(0, len(ids))]
    open_id, close_id = think_token_ids(tokenizer)
    marks = [(p, p + 1, i == open_id) for p, i in enumerate(ids) if i in (open_id, close_id)]
    return _regions(marks, len(ids))


def segment_thoughts(token_ids: Sequence[int], tokenizer: Any, *, think_only: bool = True,
                     labeler: str | LabelRules | Labeler | None = label_thought
                     ) -> list[Thought]:
    """Split a trace's token ids into labelled thoughts at `\\n\\n` delimiter tokens.

    `think_only`: keep only the `<think>` region when the trace has one (else the whole
    trace); the marks are found by id, so a tokenizer must spell `<think>`/`</think>` as single
    (special) tokens for them to count. `labeler`: `text -> label` (default SEAL's rules), a
    `LabelRules`, or a name in `LABELLERS`. A thought's text is what lies between its delimiter's
    blank line and the next one; two delimiter tokens in a row enclose an empty thought even when
    the second carries text before its blank line ("\\n\\n" then "------\\n\\n"), as in the
    official code. Empty thoughts are skipped, unless the labeler has `keep_empty` (the official
    labeller, which counts them as execution); a labeler with `official_text` sees exactly the
    official text (the tokens strictly between the two delimiters, spaces then newlines
    stripped).
    """
    ids = [int(i) for i in token_ids]
    tok = _tok(tokenizer)
    delimiters = delimiter_token_ids(tok)
    label = resolve_labeler(labeler)
    keep_empty = bool(getattr(label, "keep_empty", False))
    official = bool(getattr(label, "official_text", False))
    thoughts: list[Thought] = []
    for lo, hi in counted_regions(ids, tok, think_only=think_only):
        delims = [p for p in range(lo, hi) if ids[p] in delimiters]
        for j, pos in enumerate(delims):
            closed = j + 1 < len(delims)
            end = delims[j + 1] + 1 if closed else hi
            if official:
                text = tok.decode(ids[pos + 1:end - 1 if closed else end]).strip(" ").strip("\n")
            elif closed and end - pos == 2:  # two delimiter tokens in a row
                text = ""
            else:
                text = _thought_text(tok, ids, pos, end, closed=closed)
            if not text and not keep_empty:
                continue
            thoughts.append(Thought(index=len(thoughts), position=pos, start=pos + 1, end=end,
                                    text=text, label=label(text), n_tokens=end - pos - 1))
    return thoughts


def _thought_text(tok: Any, ids: list[int], pos: int, end: int, closed: bool) -> str:
    """Text after the blank line of delimiter `pos`, up to the blank line of the closing one."""
    text = tok.decode(ids[pos:end])
    text = text[text.index(DELIMITER) + len(DELIMITER):]  # the opening delimiter's tail
    if closed:
        text = text[:text.rindex(DELIMITER)]
    return text.strip()


def require_thoughts(thoughts: Sequence[Thought], where: str) -> Sequence[Thought]:
    """`thoughts`, or a `DataError` naming `where` when a trace yields none."""
    if not thoughts:
        raise DataError(
            f"{where}: the trace holds no '\\n\\n' delimiter inside its thinking region, so it "
            "yields no thought. Traces must keep the model's blank lines (write them as JSONL "
            "with lens_steer.traces.write_traces, not one trace per line of a .txt file)")
    return thoughts


def split_thoughts(text: str, think_only: bool = True) -> list[str]:
    """Text-level `segment_thoughts` (e.g. for generated text): paragraphs after the first.

    Consistent with the token rule: the paragraph before the first `\\n\\n` of each region is
    dropped, paragraphs are stripped, and empty ones skipped.
    """
    if think_only:
        marks = [(m.start(), m.end(), m.group() == THINK_OPEN)
                 for m in re.finditer(re.escape(THINK_CLOSE) + "|" + re.escape(THINK_OPEN), text)]
        spans = _regions(marks, len(text))
    else:
        spans = [(0, len(text))]
    out: list[str] = []
    for lo, hi in spans:
        parts = text[lo:hi].split(DELIMITER)[1:]
        out.extend(p.strip() for p in parts if p.strip())
    return out


def thought_stats(thoughts: Sequence[Thought]) -> dict[str, Any]:
    """Per-trace statistics: number of thoughts and tokens, in total and per label."""
    counts = count_by_label(t.label for t in thoughts)
    tokens = {label: 0 for label in counts}
    for t in thoughts:
        tokens[t.label] += t.n_tokens
    return {"n_thoughts": len(thoughts), "n_tokens": sum(tokens.values()),
            "counts": counts, "tokens": tokens}
