"""Efficient-reasoning methods behind one protocol, so studies and `lens-steer compare` put them
side by side under one grader and one token count.

A `Method` is built from its options (`STEERING_METHODS.get(name)(**options)`), `prepare`d on
extraction problems (SEAL: cache the model's own traces and take S; ASC: paired traces; the
rest: nothing to learn) and then `generate`s for evaluation prompts through
`ModelBackend.generate` only. Its result is a `GenerationResult` whose `tokens` say what each
sequence cost: thinking tokens (before the end-of-thinking marker, forced "Wait"s included),
answer tokens (the marker on), and trial tokens (DEER's probe answers, forced prefix included);
`n_generated` is their sum, so accuracy-per-token numbers charge every token a method paid for.

| name      | what                                                                              |
|-----------|-----------------------------------------------------------------------------------|
| `base`    | plain decoding                                                                    |
| `penalty` | logits penalty on reflection/transition trigger tokens (SEAL's baseline)          |
| `seal`    | SEAL vector at thought delimiters (`lens_steer.steering.seal`)                     |
| `asc`     | ASC concise direction with KL-calibrated or fixed strength (`...steering.asc`)     |
| `cod`     | Chain of Draft: an instruction asking for minimal drafts (<= 5 words) per step     |
| `deer`    | DEER early exit: at each trigger ("Wait") try the answer, stop when confident      |
| `budget`  | s1 budget forcing: cap thinking at N tokens and/or extend it with "Wait" up to N   |

    method = STEERING_METHODS.get("budget")(budget=128, mode="cap")
    method.prepare(model, extraction_problems, work_dir)
    records, summary = evaluate_method(method, model, problems, "toy", template="toy", config=cfg)

DEER and budget forcing live in `lens_steer.methods.phased`: they
run on top of `ModelBackend.generate` with stop strings and continued prompts (token ids), so
each continuation re-reads its prefix; token counts are exact, wall times an upper bound.
"""

from lens_steer.methods.core import (  # noqa: F401
    COD_INSTRUCTION,
    END_THINK,
    Asc,
    BaseMethod,
    ChainOfDraft,
    Method,
    MethodResult,
    Penalty,
    Seal,
    TokenCount,
    evaluate_method,
    thinking_split,
)
from lens_steer.methods.phased import BudgetForcing, Deer  # noqa: F401
