"""Synthetic arithmetic word problems with R1-style reasoning traces, deterministic from a seed.

A problem is a start value and 2-6 operations (+ and - of a digit, or doubling; values stay below 100). Its verbose trace reads

    <question>
    <think>
    Okay, Sam starts with 12 apples.            <- preamble (not a thought)

    He buys 7 more, so 12 + 7 = 19.             <- execution

    Multiplying by 3 gives 19 × 3 = 57.         <- execution (a hard step)

    Wait, let me check: 19 × 3 = 57. Yes, that's correct.     <- reflection

    So the answer is 57.
    </think>

    \\boxed{57}

Reflection and transition thoughts follow visible context, not chance alone: a multiplication
(the hard step) is followed by a reflection when the trace has not reflected yet and by a
transition (another method: splitting the product) when it has; a wrong step is usually caught
by a reflection that fixes it; a confirmed result is occasionally second-guessed into a wrong
one. Mistakes happen in execution thoughts, mostly on hard steps, so failed traces carry more
reflections and transitions than correct ones. The concise trace is the same computation in bare
math notation (one line per step, no thoughts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

ThoughtKind = str
"""A thought type: one of `lens_steer.thoughts.LABELS`."""
Op = Literal["+", "-", "×"]
THINK, END_THINK = "<think>", "</think>"
MAX_VALUE = 99

NAMES = [("Sam", "He", "his"), ("Mia", "She", "her"), ("Tom", "He", "his"), ("Ana", "She", "her"),
         ("Leo", "He", "his"), ("Zoe", "She", "her"), ("Max", "He", "his"), ("Eva", "She", "her"),
         ("Ben", "He", "his"), ("Lily", "She", "her")]
ITEMS = ["apples", "coins", "stickers", "marbles", "books", "cards", "pens", "shells",
         "stamps", "cookies"]
MULT_WORDS = {2: "doubles", 3: "triples", 4: "quadruples"}


@dataclass(frozen=True)
class Step:
    """One operation of a problem: `value_before op operand = value_after`."""

    op: Op
    operand: int
    before: int
    after: int


@dataclass
class ToyProblem:
    """A word problem with its verbose (R1-style) and concise traces."""

    question: str
    """The word problem (no trailing newline)."""
    answer: int
    """The correct final value."""
    steps: list[Step]
    verbose_trace: str
    """Completion after `prompt`: thoughts, `</think>`, then `\\boxed{N}` (no EOS)."""
    concise_trace: str
    """Completion after `prompt` in bare math notation, same answer."""
    thought_kinds: list[ThoughtKind]
    """Kind of each verbose thought (the preamble before the first `\\n\\n` excluded)."""
    verbose_answer: int
    """The answer the verbose trace boxes (differs from `answer` when its mistakes stick)."""
    n_mistakes: int = 0
    """Wrong execution steps written in the verbose trace (fixed or not)."""
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The question, then `<think>\\n`: what the model is given."""
        return f"{self.question}\n{THINK}\n"

    @property
    def verbose_correct(self) -> bool:
        return self.verbose_answer == self.answer

    def text(self, style: Literal["verbose", "concise"] = "verbose") -> str:
        """Prompt plus the trace of `style` (no EOS)."""
        return self.prompt + (self.verbose_trace if style == "verbose" else self.concise_trace)


# -- surface forms ---------------------------------------------------------------------------
def _op_str(op: Op, a: int, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}"


def _question(name: tuple[str, str, str], item: str, start: int, steps: list[Step],
              rng: random.Random) -> str:
    who, pron, poss = name
    parts = [f"{who} has {start} {item}."]
    for i, s in enumerate(steps):
        then = "" if i == 0 else rng.choice(["Then ", "Next, ", "After that, "])
        p = pron if not then else pron.lower()
        if s.op == "+":
            verb = rng.choice([f"{p} gets {s.operand} more", f"{p} finds {s.operand} more",
                               f"{p} buys {s.operand} more"])
        elif s.op == "-":
            verb = rng.choice([f"{p} gives away {s.operand}", f"{p} loses {s.operand}",
                               f"{p} uses {s.operand}"])
        else:
            verb = f"{p} {MULT_WORDS[s.operand]} {poss} {item}"
        parts.append(f"{then}{verb}.")
    parts.append(f"How many {item} does {who} have now?")
    return " ".join(parts)


def _execution(s: Step, shown: int, name: tuple[str, str, str], item: str,
               rng: random.Random) -> str:
    """An execution thought computing `s` from the visible value; `shown` is the result written."""
    pron = name[1]
    eq = _op_str(s.op, s.before, s.operand, shown)
    if s.op == "+":
        forms = [f"{pron} gets {s.operand} more, so {eq}.", f"Adding {s.operand} gives {eq}.",
                 f"Then {eq} {item}."]
    elif s.op == "-":
        forms = [f"{pron} gives away {s.operand}, so {eq}.", f"Taking away {s.operand} leaves {eq}.",
                 f"Then {eq} {item}."]
    else:
        forms = [f"Multiplying by {s.operand} gives {eq}.", f"{pron} now has {eq} {item}.",
                 f"Next, {eq}."]
    return rng.choice(forms)


def _confirm(s: Step, shown: int, rng: random.Random) -> str:
    """A reflection that re-computes `s` and confirms the visible value `shown`."""
    eq = _op_str(s.op, s.before, s.operand, shown)
    return rng.choice([f"Wait, let me check: {eq}. Yes, that's correct.",
                       f"Let me verify that: {eq}, so {shown} is right.",
                       f"Hold on, {eq}. That seems right.",
                       f"Let me make sure: {eq}. Good."])


def _fix(s: Step, wrong: int, rng: random.Random) -> str:
    """A reflection that catches a wrong step and states the right value."""
    eq = _op_str(s.op, s.before, s.operand, s.after)
    return rng.choice([f"Wait, {eq}, not {wrong}. So it is {s.after}.",
                       f"Hold on, {wrong} is wrong: {eq}.",
                       f"Let me check again: {eq}, so {wrong} was a mistake."])


def _second_guess(s: Step, wrong: int, rng: random.Random) -> str:
    """A reflection that breaks a correct result."""
    eq = _op_str(s.op, s.before, s.operand, wrong)
    return rng.choice([f"Wait, let me think again: {eq}. So it is {wrong}.",
                       f"Hold on, maybe {eq} instead. So it is {wrong}."])


def is_hard(s: Step) -> bool:
    """Hard steps: a multiplication, or a subtraction that borrows."""
    return s.op == "×" or (s.op == "-" and s.operand % 10 > s.before % 10)


def _transition(s: Step, rng: random.Random) -> str:
    """Another method for a hard step: split a number into tens and units."""
    if s.op == "-":
        tens, units = divmod(s.operand, 10)
        if tens == 0:
            mid = s.before - s.before % 10
            body = (f"{s.before} - {s.before % 10} - {units - s.before % 10} = "
                    f"{mid} - {units - s.before % 10} = {s.after}")
        else:
            mid = s.before - tens * 10
            body = f"{s.before} - {tens * 10} - {units} = {mid} - {units} = {s.after}"
        return rng.choice([f"Alternatively, split it up: {body}.",
                           f"Let me try another way: {body}.",
                           f"Using another method, {body}."])
    tens, units = divmod(s.before, 10)
    k = s.operand
    if tens == 0:
        body = f"{k} × {s.before} = {s.after}"
    else:
        body = (f"{tens * 10} × {k} + {units} × {k} = {tens * 10 * k} + {units * k} = "
                f"{s.after}")
    return rng.choice([f"Alternatively, split it up: {body}.",
                       f"Let me try another way: {body}.",
                       f"Using another method, {body}."])


def _final(value: int, name: tuple[str, str, str], item: str, rng: random.Random) -> str:
    return rng.choice([f"So the answer is {value}.", f"So {name[0]} has {value} {item} now.",
                       f"That leaves {value} {item} in the end."])


def _wrong_value(s: Step, rng: random.Random) -> int:
    """A plausible wrong result for `s`."""
    deltas = [-10, -2, -1, 1, 2, 10] + ([-s.before, s.before] if s.op == "×" else [])
    for _ in range(20):
        w = s.after + rng.choice(deltas)
        if 0 <= w <= MAX_VALUE and w != s.after:
            return w
    return s.after + 1


# -- problem sampling ------------------------------------------------------------------------
def _sample_steps(rng: random.Random) -> tuple[int, list[Step]]:
    n = rng.randint(2, 6)
    x = start = rng.randint(10, 60)
    steps = []
    for _ in range(n):
        options: list[Op] = ["+", "-"]
        if x * 2 <= MAX_VALUE:
            options += ["×"]
        op = rng.choice(options)
        if op == "+":
            b = rng.randint(2, min(9, MAX_VALUE - x)) if x <= MAX_VALUE - 2 else None
        elif op == "-":
            b = rng.randint(2, min(9, x - 1)) if x > 3 else None
        else:
            b = 2
        if b is None:
            op, b = ("-", 2) if x > 3 else ("+", 2)
        y = x + b if op == "+" else x - b if op == "-" else x * b
        steps.append(Step(op, b, x, y))
        x = y
    return start, steps


@dataclass
class TraceRates:
    """Probabilities of the verbose trace's behaviours (all decisions also depend on context)."""

    mistake_hard: float = 0.12
    """A hard step (see `is_hard`) is written wrong."""
    mistake_easy: float = 0.02
    """An easy step is written wrong."""
    catch: float = 0.75
    """After a wrong step: a reflection fixes it."""
    false_confirm: float = 0.1
    """After a wrong step: a reflection wrongly confirms it (else no reflection)."""
    reflect_hard: float = 0.75
    """After a correct hard step, no earlier reflection/transition: reflect."""
    transition_hard: float = 0.7
    """After a correct hard step, with an earlier reflection: switch method."""
    reflect_easy: float = 0.03
    """After a correct easy step: reflect anyway."""
    second_guess: float = 0.06
    """After a confirming reflection: a further reflection breaks the correct value."""


def _verbose(start: int, steps: list[Step], name, item, rng: random.Random,
             rates: TraceRates) -> tuple[list[str], list[ThoughtKind], int, int]:
    thoughts: list[str] = []
    kinds: list[ThoughtKind] = []
    value, mistakes = start, 0
    for s in steps:
        s = Step(s.op, s.operand, value, _apply(s.op, value, s.operand))
        hard = is_hard(s)
        wrong = rng.random() < (rates.mistake_hard if hard else rates.mistake_easy)
        shown = _wrong_value(s, rng) if wrong else s.after
        mistakes += wrong
        thoughts.append(_execution(s, shown, name, item, rng))
        kinds.append("execution")
        reflected = "reflection" in kinds[:-1] or "transition" in kinds[:-1]
        u = rng.random()
        if wrong:
            if u < rates.catch:
                thoughts.append(_fix(s, shown, rng))
                kinds.append("reflection")
                shown = s.after
            elif u < rates.catch + rates.false_confirm:
                thoughts.append(_confirm(Step(s.op, s.operand, s.before, shown), shown, rng))
                kinds.append("reflection")
        elif hard and not reflected and u < rates.reflect_hard:
            thoughts.append(_confirm(s, shown, rng))
            kinds.append("reflection")
            if rng.random() < rates.second_guess:
                shown = _wrong_value(s, rng)
                thoughts.append(_second_guess(s, shown, rng))
                kinds.append("reflection")
        elif hard and reflected and u < rates.transition_hard:
            thoughts.append(_transition(s, rng))
            kinds.append("transition")
        elif not hard and u < rates.reflect_easy:
            thoughts.append(_confirm(s, shown, rng))
            kinds.append("reflection")
        value = shown
    thoughts.append(_final(value, name, item, rng))
    kinds.append("execution")
    return thoughts, kinds, value, mistakes


def _apply(op: Op, x: int, b: int) -> int:
    return x + b if op == "+" else x - b if op == "-" else x * b


def _preamble(start: int, name, item, rng: random.Random) -> str:
    return rng.choice([f"Okay, {name[0]} starts with {start} {item}.",
                       f"Let me solve this step by step. {name[0]} starts with {start} {item}.",
                       f"Alright, there are {start} {item} at first."])


def make_problem(rng: random.Random, rates: TraceRates | None = None) -> ToyProblem:
    """Sample one problem and both of its traces from `rng`."""
    rates = rates or TraceRates()
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, steps = _sample_steps(rng)
    question = _question(name, item, start, steps, rng)
    thoughts, kinds, v_answer, mistakes = _verbose(start, steps, name, item, rng, rates)
    answer = steps[-1].after
    verbose = ("\n\n".join([_preamble(start, name, item, rng), *thoughts])
               + f"\n{END_THINK}\n\n\\boxed{{{v_answer}}}")
    concise = ("\n".join(_op_str(s.op, s.before, s.operand, s.after) for s in steps)
               + f"\n{END_THINK}\n\n\\boxed{{{answer}}}")
    return ToyProblem(question=question, answer=answer, steps=steps, verbose_trace=verbose,
                      concise_trace=concise, thought_kinds=kinds, verbose_answer=v_answer,
                      n_mistakes=mistakes)


def generate_problems(n: int, seed: int, rates: TraceRates | None = None) -> list[ToyProblem]:
    """`n` problems, identical for identical (n, seed, rates)."""
    rng = random.Random(seed)
    return [make_problem(rng, rates) for _ in range(n)]


def split_verbose_thoughts(trace: str) -> list[str]:
    """The thoughts of a verbose completion (text inside think, preamble excluded)."""
    inner = trace.split(END_THINK)[0]
    return [t.strip() for t in inner.split("\n\n")[1:] if t.strip()]
