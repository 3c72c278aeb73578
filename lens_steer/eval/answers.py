"""Answer extraction and answer checking for MATH-style and GSM8K-style problems.

Extraction: the last ``\\boxed{...}``/``\\fbox{...}`` (nested braces), GSM8K's ``#### N`` and
"The answer is N". Checking: :func:`is_equiv` normalises LaTeX (fractions, ``\\dfrac``, ``\\text{}``,
units, degrees, percent, thousands separators, ``x = 5``), compares tuples/intervals elementwise,
then numerically (relative tolerance) and symbolically with sympy; :func:`numeric_match` is GSM8K's
exact numeric match. Parsing model output never raises: anything unparsable falls back to string
equality of the normalised forms.

Sympy work is bounded (:func:`latex_to_sympy` rejects towers, huge factorials and deep nesting
before evaluating; :func:`is_equiv` runs under a wall-clock budget): an answer that would take
too long compares "not equal", and the reason is logged on the ``lens_steer.eval.answers`` logger.
Grading protocols (which extraction, which fallbacks) live in :mod:`lens_steer.eval.grading`.
Over 400 lines: extraction, normalisation, the LaTeX-to-sympy bridge and its guards share the
brace matcher and the normaliser, and each answer form needs its own small rule.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from functools import lru_cache
from typing import Any

__all__ = ["extract_boxed", "extract_boxed_all", "extract_answer", "normalize_answer", "is_equiv", "numeric_match",
           "latex_to_sympy"]

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- extraction

def _match_brace(s: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at `open_idx`, or None if unbalanced."""
    depth = 0
    i = open_idx
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            i += 2  # escaped brace \{ \} does not count
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxes(text: str) -> Iterator[tuple[str, bool]]:
    """(content, braced) of every complete, non-empty box in `text`, in order.

    Braced boxes nest; the brace-less ``\\boxed 5`` runs up to whitespace / $ / end. Unclosed
    boxes (a truncated generation) and empty ones (a prompt's ``\\boxed{}``) are skipped.
    """
    for m in _BOXED_RE.finditer(text):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            close = _match_brace(text, j)
            if close is not None and text[j + 1:close].strip():
                yield text[j + 1:close].strip(), True
        elif j > m.end():
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                yield tok.group(0).rstrip(".").strip(), False


def extract_boxed(text: str | None) -> str | None:
    """Content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` in `text`, else None.

    Braces nest (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); the brace-less form
    ``\\boxed 5`` is accepted too. If the last box is unclosed (a truncated generation) or empty
    (the instruction's ``\\boxed{}``), the previous complete one is returned.
    """
    last = None
    for content, _ in _boxes(text or ""):
        last = content
    return last


def extract_boxed_all(text: str | None) -> list[str]:
    """Contents of every complete, non-empty ``\\boxed{...}`` in `text`, in order."""
    return [content for content, braced in _boxes(text or "") if braced]


_GSM_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"(?:the\s+)?(?:final\s+)?answer\s+is\s*[:：]?\s*(.+?)(?=\.\s|\.?\s*$|\n)",
    re.IGNORECASE | re.MULTILINE)
_ANSWER_LINE_RE = re.compile(
    r"^[*#>\s-]{0,6}(?:the\s+)?(?:final\s+)?answer\**\s*[:：]\**\s*(.+)$",
    re.IGNORECASE | re.MULTILINE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _strip_thousands(s: str) -> str:
    """``1,234,567`` -> ``1234567``; leaves other commas (tuples, lists) alone."""
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)


def _clean_inline(s: str) -> str:
    """Strip markdown emphasis, surrounding ``$`` and trailing punctuation from a span."""
    s = s.strip().strip("*").strip()
    s = s.rstrip(".").strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$") and not s.startswith("\\$"):
        s = s.strip("$").strip()
    boxed = extract_boxed(s)
    return boxed if boxed is not None else s


def extract_answer(text: str | None, style: str = "auto") -> str | None:
    """The final answer in a generation or reference solution, or None when there is none.

    `style`: "boxed" (last ``\\boxed{}``), "gsm8k" (``#### N``; thousands separators dropped),
    "answer_is" (last "The answer is N", trailing period dropped), "answer_line" (the last
    ``**Answer:** ...`` / ``Final answer: ...`` line; a sentence with one number gives that
    number), "last_number" (the last number
    in the text; a lenient GSM8K fallback, never used by "auto"), or "auto" (boxed, then
    ``#### N``, then "The answer is N", then an answer line).
    """
    if not text:
        return None
    if style == "boxed":
        return extract_boxed(text)
    if style == "gsm8k":
        ms = _GSM_RE.findall(text)
        if not ms:
            return None
        ans = _strip_thousands(_clean_inline(ms[-1]))
        return ans or None
    if style == "answer_is":
        ms = _ANSWER_IS_RE.findall(text)
        if not ms:
            return None
        ans = _clean_inline(ms[-1])
        return ans or None
    if style == "answer_line":
        ms = _ANSWER_LINE_RE.findall(text)
        if not ms:
            return None
        ans = _clean_inline(ms[-1])
        nums = _NUMBER_RE.findall(ans)
        if re.search(r"[a-zA-Z]{2,}\s+[a-zA-Z]{2,}", _unwrap_commands(ans, _TEXT_CMD_RE)) \
                and len(nums) == 1:
            ans = nums[0]  # "Billy sold 7 DVDs." -> "7"
        return ans or None
    if style == "last_number":
        nums = _NUMBER_RE.findall(text)
        return _strip_thousands(nums[-1]).replace(",", "") if nums else None
    if style == "auto":
        for sub in ("boxed", "gsm8k", "answer_is", "answer_line"):
            ans = extract_answer(text, sub)
            if ans is not None:
                return ans
        return None
    raise ValueError(f"unknown extraction style {style!r}; use 'auto', 'boxed', 'gsm8k', "
                     "'answer_is', 'answer_line' or 'last_number'")


# ----------------------------------------------------------------------------- normalisation

_UNIT_WORDS = (
    "square units", "sq units", "cubic units", "units", "unit", "square feet", "square inches",
    "square meters", "square centimeters", "sq ft", "cm^2", "m^2", "cm^3", "m^3", "mm", "cm", "km",
    "m", "meters", "meter", "metres", "centimeters", "kilometers", "inches", "inch", "in",
    "feet", "foot", "ft", "yards", "yard", "miles", "mile", "mph", "degrees", "degree",
    "dollars", "dollar", "cents", "cent", "hours", "hour", "hrs", "minutes", "minute", "mins",
    "seconds", "second", "sec", "days", "day", "weeks", "week", "years", "year", "pounds",
    "pound", "lbs", "ounces", "ounce", "oz", "grams", "gram", "g", "kg", "liters", "liter", "ml",
    "gallons", "gallon", "people", "students", "points", "ways", "apples", "percent",
)
_UNIT_RE = re.compile(
    r"(?<=[\d}.)])\s+(?:" + "|".join(re.escape(u) for u in sorted(_UNIT_WORDS, key=len,
                                                                     reverse=True))
    + r")\.?\s*$", re.IGNORECASE)
_NUMBER_WORDS_RE = re.compile(  # "6 Trinkets", "864 inches^2", "7 DVDs." -> the number
    r"^(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+|\\[dt]?frac{-?\d+}{\d+}))\s+"
    r"(?!(?:pi|and|or|to|sqrt|i|e)\b)[A-Za-z]{2,}[A-Za-z.'\s]*(?:\^\s*{?\s*[23]\s*}?)?\.?$")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|operatorname)\s*{")


def _unwrap_commands(s: str, cmd_re: re.Pattern[str], keep: bool = True) -> str:
    """Replace ``\\text{X}`` (any command in `cmd_re`) by ``X`` (or drop it if not `keep`)."""
    out = []
    i = 0
    while True:
        m = cmd_re.search(s, i)
        if not m:
            out.append(s[i:])
            break
        close = _match_brace(s, m.end() - 1)
        if close is None:
            out.append(s[i:])
            break
        out.append(s[i:m.start()])
        if keep:
            out.append(s[m.end():close])
        i = close + 1
    return "".join(out)


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{b}`` -> ``\\frac{1}{b}`` (also ``\\sqrt2``)."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*({[^{}]*})\s*([0-9a-zA-Z])", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    return s


def _repeating_to_frac(m: re.Match[str]) -> str:
    """``0.1\\overline{6}`` -> ``\\frac{1}{6}`` (exact value of a repeating decimal)."""
    whole, fixed, rep = m.group(1) or "0", m.group(2), m.group(3)
    tail = Fraction(int(fixed or "0")) + Fraction(int(rep), 10 ** len(rep) - 1)
    val = Fraction(int(whole)) + tail / 10 ** len(fixed)
    return f"\\frac{{{val.numerator}}}{{{val.denominator}}}"


def normalize_answer(s: str | None) -> str:
    """Canonical string form of a MATH-style answer (whitespace-free, LaTeX-light).

    Drops ``$``, ``\\left``/``\\right``, spacing commands, ``^\\circ``, ``\\%``, ``\\text{}`` wrappers
    and trailing units, thousands separators, a leading ``x =``; unifies ``\\dfrac``/``\\tfrac``
    to ``\\frac`` and ``\\frac12`` to ``\\frac{1}{2}``; ``.5`` -> ``0.5``; ``5.0`` -> ``5``.
    """
    if s is None:
        return ""
    s = str(s).strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\n", " ")
    s = re.sub(r"(?<!\\)\\(?:,|;|:| |!|quad|qquad)", " ", s)  # spacing, not the "\\" row break
    s = re.sub(r"(\d*)\.(\d*)\\overline\s*{(\d+)}", _repeating_to_frac, s)
    s = s.replace("~", " ").replace("\\displaystyle", "")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])\s*", "", s)
    s = s.replace("\\{", "{").replace("\\}", "}") if s.startswith("\\{") else s
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    # degrees, percent, currency
    s = re.sub(r"\^\s*{?\s*\\circ\s*}?", "", s).replace("\\circ", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "").replace("$", "")
    # units written in \text{...} right after a number: drop; other \text{X}: keep X
    s = re.sub(r"\\(?:text|mbox|mathrm)\s*{\s*(?:"
               + "|".join(re.escape(u) for u in sorted(_UNIT_WORDS, key=len, reverse=True))
               + r")\.?\s*}\s*$", "", s, flags=re.IGNORECASE)
    s = _unwrap_commands(s, _TEXT_CMD_RE)
    s = s.strip()
    s = _UNIT_RE.sub("", s).strip()
    s = _NUMBER_WORDS_RE.sub(r"\1", s)
    s = s.replace("{,}", "")
    # "x = 5", "y=\frac12", "x \in [0, 1)": keep the right-hand side of a short lhs
    parts = re.split(r"\\in(?![a-zA-Z])|=", s)
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        s = parts[1]
    s = s.replace("\\dots", "").replace("\\ldots", "").rstrip(".").strip()
    s = _fix_fracs(s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^\\?\(?([A-E])\)?$", r"\1", s)  # multiple choice "(A)" -> "A"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    if re.fullmatch(r"-?\d+\.0*", s):
        s = s.split(".")[0]
    elif re.fullmatch(r"-?\d+\.\d*[1-9]0+", s):
        s = s.rstrip("0")
    s = s.replace("+-", "-")
    if s in ("-0", "+0"):
        s = "0"
    return s


# ----------------------------------------------------------------------------- LaTeX -> sympy

_LATEX_FUNCS = {
    "\\sin": "sin", "\\cos": "cos", "\\tan": "tan", "\\cot": "cot", "\\sec": "sec",
    "\\csc": "csc", "\\arcsin": "asin", "\\arccos": "acos", "\\arctan": "atan", "\\ln": "log",
    "\\log": "log", "\\exp": "exp",
}
_LATEX_SYMBOLS = {
    "\\pi": " pi ", "\\infty": " oo ", "\\cdot": "*", "\\times": "*", "\\div": "/",
    "\\ast": "*", "\\sqrt": "sqrt", "\\theta": " theta ", "\\alpha": " alpha ",
    "\\beta": " beta ", "\\phi": " phi ",
}
_ALLOWED_NAMES = {"binomial", "factorial", "sqrt", "pi", "oo", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos",
                  "atan", "log", "exp", "theta", "alpha", "beta", "phi", "I"}
_MAX_EXPR_LEN = 200


def _replace_two_arg(s: str, cmd: str, fmt: str) -> str | None:
    """Rewrite every ``\\cmd{a}{b}`` (regex `cmd`) as `fmt` with a, b; None when malformed."""
    for _ in range(50):
        m = re.search(cmd, s)
        if not m:
            return s
        start, j = m.start(), m.end()
        if j >= len(s) or s[j] != "{":
            return None
        c1 = _match_brace(s, j)
        if c1 is None or c1 + 1 >= len(s) or s[c1 + 1] != "{":
            return None
        c2 = _match_brace(s, c1 + 1)
        if c2 is None:
            return None
        s = f"{s[:start]}{fmt.format(a=s[j + 1:c1], b=s[c1 + 2:c2])}{s[c2 + 1:]}"
    return s


def _replace_frac_sqrt(s: str) -> str | None:
    """Rewrite ``\\frac{a}{b}`` -> ``((a)/(b))`` and ``\\sqrt[n]{x}`` -> ``((x)**(1/(n)))``."""
    for cmd, fmt in ((r"\\[dt]?frac", "(({a})/({b}))"), (r"\\[dt]?binom", "binomial(({a}),({b}))")):
        s = _replace_two_arg(s, cmd, fmt)
        if s is None:
            return None
    for _ in range(50):
        m = re.search(r"\\sqrt\s*\[", s)
        if not m:
            break
        k = s.find("]", m.end())
        if k < 0 or k + 1 >= len(s) or s[k + 1] != "{":
            return None
        c = _match_brace(s, k + 1)
        if c is None:
            return None
        s = f"{s[:m.start()]}(({s[k + 2:c]})**(1/({s[m.end():k]}))){s[c + 1:]}"
    return s


def _latex_to_python(s: str) -> str | None:
    """Turn a normalised LaTeX answer into a whitelisted python/sympy expression string."""
    s = _replace_frac_sqrt(s)
    if s is None:
        return None
    for k in sorted(_LATEX_FUNCS, key=len, reverse=True):
        s = re.sub(re.escape(k) + r"(?![a-zA-Z])", _LATEX_FUNCS[k], s)
    for k in sorted(_LATEX_SYMBOLS, key=len, reverse=True):
        s = re.sub(re.escape(k) + r"(?![a-zA-Z])", _LATEX_SYMBOLS[k], s)
    if "\\" in s:
        return None  # an unknown command: not safe to guess
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    s = re.sub(r"(\d+|\([^()]*\))!", r"factorial(\1)", s)  # 5! -> factorial(5)
    if "binomial(" in s:  # sympy evaluates binomial even unevaluated: keep its arguments small
        args = s[s.index("binomial("):]
        if "**" in args or re.search(r"\d{5,}", args):
            log.info("not parsed: %r has a binomial with large arguments", s[:60])
            return None
        s = s.replace(",", ", ")
    s = re.sub(r"(?<![a-zA-Z])i(?![a-zA-Z])", "I", s)  # imaginary unit
    if not re.fullmatch(r"[0-9a-zA-Z_+\-*/(). ,]*", s) or "__" in s or not s.strip():
        return None
    for name in re.findall(r"[a-zA-Z_]+", s):
        if len(name) > 1 and name not in _ALLOWED_NAMES and not _splittable(name):
            return None
    return s


def _splittable(name: str) -> bool:
    """Whether a multi-letter run is a product of single-letter symbols (e.g. ``xy``)."""
    return len(name) <= 3 and name.isalpha()


MAX_DIGITS = 20_000
"""Largest number (in decimal digits) an answer may evaluate to; larger compares not-equal."""
MAX_SYMBOLIC_EXPONENT = 200
"""Largest exponent of a power with symbols (``(x+1)^{200}`` still expands in milliseconds)."""
MAX_NODES = 400
MAX_DEPTH = 40
GRADING_BUDGET_S = 2.0
"""Wall-clock budget of one :func:`is_equiv` call (main thread; elsewhere only the static
guards apply): past it the answers compare not-equal."""


def _log10_size(node: Any) -> float:
    """Upper estimate of log10 of the largest number that evaluating `node` would build."""
    import sympy

    if node.is_Number:
        if node.is_Rational:
            return max(math.log10(abs(int(node.p)) or 1), math.log10(abs(int(node.q)) or 1))
        return math.log10(abs(float(node)) or 1) if math.isfinite(float(node)) else math.inf
    if not node.args:
        return 1.0
    if isinstance(node, sympy.Pow):
        base, exp = node.args
        size_e = _log10_size(exp)
        if size_e > 8:
            return math.inf
        if base.free_symbols:
            return math.inf if 10 ** size_e > MAX_SYMBOLIC_EXPONENT else _log10_size(base)
        return (10 ** size_e) * max(_log10_size(base), 0.0)
    if isinstance(node, sympy.Mul):
        return sum(max(_log10_size(a), 0.0) for a in node.args)
    if isinstance(node, sympy.factorial):
        size = _log10_size(node.args[0])
        return math.inf if size > 6 else (10 ** size) * max(size, 1.0)
    if isinstance(node, sympy.binomial):
        size = max(_log10_size(a) for a in node.args)
        return math.inf if size > 6 else (10 ** size) * 0.302
    return max(_log10_size(a) for a in node.args) + math.log10(len(node.args))


def _too_costly(expr: Any) -> str | None:
    """Why evaluating the unevaluated tree `expr` could hang, or None when it is cheap."""
    import sympy

    n_nodes = sum(1 for _ in sympy.preorder_traversal(expr))
    if n_nodes > MAX_NODES:
        return f"{n_nodes} nodes > {MAX_NODES}"
    size = _log10_size(expr)
    if size > MAX_DIGITS:
        return f"evaluates to about 10^{size:.3g} (> {MAX_DIGITS} digits)"
    return None


class _Timeout(Exception):
    pass


@contextmanager
def _budget(seconds: float) -> Iterator[None]:
    """Raise `_Timeout` inside the block after `seconds` (SIGALRM; main thread only)."""
    if (seconds <= 0 or threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, "setitimer")):
        yield
        return
    prev_timer = signal.getitimer(signal.ITIMER_REAL)
    if prev_timer[0] > 0:  # someone else's alarm is running: leave it alone
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout

    prev = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, prev)


def _depth(s: str) -> int:
    depth = best = 0
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        best = max(best, depth)
    return best


@lru_cache(maxsize=4096)
def latex_to_sympy(s: str) -> Any | None:
    """Parse a (normalised) LaTeX answer into a sympy expression; None when it cannot.

    Only a whitelisted character set and name set reach sympy's ``parse_expr`` (which evals), and
    huge numeric towers are rejected first, so arbitrary model output is safe to pass.
    """
    if not s or len(s) > _MAX_EXPR_LEN:
        return None
    if _depth(s) > MAX_DEPTH:
        log.info("not parsed: %r nests deeper than %d", s[:60], MAX_DEPTH)
        return None
    py = _latex_to_python(s)
    if py is None:
        return None
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            convert_xor,
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )

        local: dict[str, Any] = {c: sympy.Symbol(c) for c in "abcdefghjklmnopqrstuvwxyz"}
        local.update({c: sympy.Symbol(c) for c in "ABCDEFGHJKLMNOPQRSTUVWXYZ"})
        local.update({"I": sympy.I, "pi": sympy.pi, "oo": sympy.oo})
        for name in ("theta", "alpha", "beta", "phi"):
            local[name] = sympy.Symbol(name)
        tr = standard_transformations + (implicit_multiplication_application, convert_xor)
        raw = parse_expr(py, local_dict=dict(local), transformations=tr, evaluate=False)
        why = _too_costly(raw)
        if why is not None:
            log.info("not evaluated: %r %s; compared as not equal", s[:60], why)
            return None
        return parse_expr(py, local_dict=dict(local), transformations=tr)
    except _Timeout:
        raise
    except Exception:  # noqa: BLE001 - any parse failure means "not symbolic"
        return None


def _sympy_equal(a: Any, b: Any, numeric_tol: float) -> bool:
    import sympy

    try:
        if not (a.free_symbols or b.free_symbols):
            va, vb = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
            return abs(va - vb) <= numeric_tol * max(1.0, abs(vb))
        diff = sympy.simplify(a - b)
        return bool(diff == 0)
    except _Timeout:
        raise
    except Exception:  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------- equivalence

_PAIRS = {"(": ")", "[": "]", "{": "}"}


def _split_top_level(s: str) -> list[str]:
    """Split on commas not nested in (), [], {}."""
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def _as_sequence(s: str) -> tuple[str, str, list[str]] | None:
    """``(1,2]`` -> ("(", "]", ["1", "2"]); a bare top-level list ``1,2`` -> ("", "", [...])."""
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        depth = 0
        for i, c in enumerate(s):
            depth += c in "([{"
            depth -= c in ")]}"
            if depth == 0 and i < len(s) - 1:
                break  # e.g. "(1)+(2)": the outer brackets do not enclose everything
        else:
            inner = _split_top_level(s[1:-1])
            if len(inner) > 1:
                return s[0], s[-1], inner
            return None
    parts = _split_top_level(s)
    return ("", "", parts) if len(parts) > 1 else None


def is_equiv(pred: str | None, gold: str | None, *, numeric_tol: float = 1e-6,
             budget_s: float = GRADING_BUDGET_S) -> bool:
    """Whether a predicted MATH-style answer equals the gold answer.

    Order: normalised strings equal; tuples/intervals elementwise (bracket kinds must agree; sets
    ``\\{1,2\\}`` and bare comma lists of solutions compare as multisets); numbers within a relative
    tolerance `numeric_tol`; sympy ``simplify(a - b) == 0``; matrices entrywise; multi-letter
    words case-insensitively. Never raises; work beyond `budget_s` seconds (or answers that
    would evaluate to huge numbers) compares not-equal, with the reason logged.
    """
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    import sympy  # noqa: F401, PLC0415 - the first import (~1 s) is not the comparison's time

    t0 = time.perf_counter()
    try:
        with _budget(budget_s):
            return _is_equiv_norm(a, b, numeric_tol)
    except _Timeout:
        log.info("not equal: comparing %r with %r took over %.2g s", a[:60], b[:60], budget_s)
        return False
    except Exception:  # noqa: BLE001 - a checker must not crash a run
        return a == b
    finally:
        if time.perf_counter() - t0 > budget_s:
            log.info("slow comparison %r vs %r: %.2f s", a[:60], b[:60],
                     time.perf_counter() - t0)


_MATRIX_RE = re.compile(r"\\begin{([pbvBV]?matrix|array)}(?:{[^{}]*})?(.*)\\end{\1}")
_WORDS_RE = re.compile(r"[A-Za-z]{2,}[A-Za-z\-']*")


def _as_matrix(s: str) -> list[list[str]] | None:
    m = _MATRIX_RE.fullmatch(s)
    if not m:
        return None
    rows = [r for r in re.split(r"\\\\", m.group(2)) if r]
    return [r.split("&") for r in rows]


def _is_equiv_norm(a: str, b: str, tol: float) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    if _WORDS_RE.fullmatch(a) and _WORDS_RE.fullmatch(b):  # "Ellipse" == "ellipse"
        return a.lower() == b.lower()
    ma, mb = _as_matrix(a), _as_matrix(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None or [len(r) for r in ma] != [len(r) for r in mb]:
            return False
        return all(_is_equiv_norm(x, y, tol) for ra, rb in zip(ma, mb, strict=True)
                   for x, y in zip(ra, rb, strict=True))
    sa, sb = _as_sequence(a), _as_sequence(b)
    if sa is not None or sb is not None:
        if sa is None or sb is None:
            return False
        (oa, ca, xa), (ob, cb, xb) = sa, sb
        if (oa, ca) != (ob, cb) or len(xa) != len(xb):
            return False
        if oa in ("", "{"):  # sets and bare lists of solutions: order-free
            remaining = list(xb)
            for x in xa:
                hit = next((k for k, y in enumerate(remaining) if _is_equiv_norm(x, y, tol)), None)
                if hit is None:
                    return False
                remaining.pop(hit)
            return True
        return all(_is_equiv_norm(x, y, tol) for x, y in zip(xa, xb, strict=True))
    fa, fb = _to_float(a), _to_float(b)
    if fa is not None and fb is not None:
        return abs(fa - fb) <= tol * max(1.0, abs(fb))
    ea, eb = latex_to_sympy(a), latex_to_sympy(b)
    if ea is None or eb is None:
        return False
    return _sympy_equal(ea, eb, tol)


def _to_float(s: str) -> float | None:
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", s):
        return float(s)
    return None


def numeric_match(pred: str | None, gold: str | None) -> bool:
    """GSM8K exact numeric match: ``"1,234"`` == ``"1234"`` == ``"$1234.00"``; else False.

    A prediction carrying units or words ("18 apples") matches when it holds exactly one number.
    """
    p, g = _exact_number(pred), _exact_number(gold)
    return p is not None and g is not None and p == g


def _exact_number(s: str | None) -> Fraction | None:
    if s is None:
        return None
    s = str(s)
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = _unwrap_commands(s, _TEXT_CMD_RE)
    s = re.sub(r"\\[!,;: ]|\\%|%|\\\$|\$|\s", "", s)
    s = s.replace("{,}", ",")
    s = _strip_thousands(s).rstrip(".")
    m = re.fullmatch(r"\\d?frac{(-?\d+)}{(\d+)}", s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        pass
    nums = _NUMBER_RE.findall(s)
    if len(nums) == 1:
        try:
            return Fraction(nums[0].replace(",", ""))
        except (ValueError, ZeroDivisionError):
            return None
    return None
