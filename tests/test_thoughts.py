"""Thought segmentation on token ids (byte-level BPE merging `\\n\\n` with punctuation) and
SEAL's labelling rules."""

from __future__ import annotations

import pytest

from lens_steer.testing import build_tokenizer
from lens_steer.thoughts import (
    LABELS,
    SEAL_RULES,
    LabelRules,
    count_by_label,
    delimiter_token_ids,
    is_delimiter_token,
    label_thought,
    segment_thoughts,
    split_thoughts,
    think_region_predicate,
    think_token_ids,
    thought_stats,
)

TRACE = ("Question: 2+2?\n<think>\nWe add.\n\nSo 2 + 2 = 4.\n\nWait, alternatively check it.\n\n"
         " Another way: count.\n\n</think>\nThe answer is 4.\n\nDone.")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_delimiters_are_merged_tokens(tok):
    ids = delimiter_token_ids(tok)
    texts = sorted(tok.decode([i]) for i in ids)
    assert texts == ["\n\n", " \n\n", ".\n\n"]
    assert delimiter_token_ids(tok) is ids  # cached per tokenizer
    assert is_delimiter_token(".\n\n") and is_delimiter_token("\n\n\n")
    assert not is_delimiter_token(".\n") and not is_delimiter_token("\n \n")
    # the merge really happens: "4.\n\n" ends in one `.\n\n` token, not "." + "\n\n"
    assert tok.decode([enc(tok, "4.\n\nSo")[-2]]) == ".\n\n"
    open_id, close_id = think_token_ids(tok)
    assert tok.decode([open_id]) == "<think>" and tok.decode([close_id]) == "</think>"


def test_segment_positions_point_at_delimiters(tok):
    ids = enc(tok, TRACE)
    thoughts = segment_thoughts(ids, tok)
    assert [t.text for t in thoughts] == [
        "So 2 + 2 = 4.", "Wait, alternatively check it.", "Another way: count."]
    assert [t.label for t in thoughts] == ["execution", "reflection", "transition"]
    assert [t.index for t in thoughts] == [0, 1, 2]
    strings = [tok.decode([i]) for i in ids]
    # each position is the `.\n\n` that ends the previous paragraph and opens the thought
    for t in thoughts:
        assert strings[t.position] == ".\n\n"
        assert t.start == t.position + 1 and t.n_tokens == t.end - t.start
    assert "".join(strings[:thoughts[0].position + 1]).endswith("We add.\n\n")
    # spans tile the region: each thought ends at (and includes) the next delimiter
    assert thoughts[0].end == thoughts[1].position + 1
    assert strings[thoughts[2].end] == "</think>"
    # nothing outside <think>: "Done." after </think> is not a thought
    assert all(t.position < ids.index(think_token_ids(tok)[1]) for t in thoughts)


def test_segment_whole_trace_and_without_think(tok):
    ids = enc(tok, TRACE)
    everything = segment_thoughts(ids, tok, think_only=False)
    assert [t.text for t in everything][:3] == [
        "So 2 + 2 = 4.", "Wait, alternatively check it.", "Another way: count."]
    assert everything[-1].text.endswith("Done.")
    plain = enc(tok, "First part.\n\nSecond part.\n\nThird part")
    texts = [t.text for t in segment_thoughts(plain, tok)]
    assert texts == ["Second part.", "Third part"]  # no think marks: the whole trace counts
    assert segment_thoughts(enc(tok, "No blank line here."), tok) == []


def test_unclosed_and_prompt_opened_think(tok):
    truncated = enc(tok, "<think>\nA.\n\nB is 3.\n\nWait, so")
    assert [t.text for t in segment_thoughts(truncated, tok)] == ["B is 3.", "Wait, so"]
    # the chat template put <think> in the prompt: the trace only closes it
    generated = enc(tok, "A.\n\nB.\n\n</think>\nAnswer.\n\nAfter.")
    assert [t.text for t in segment_thoughts(generated, tok)] == ["B."]


def test_consecutive_delimiters_skip_empty_thoughts(tok):
    ids = enc(tok, "<think>\nA.\n\n \n\nB.\n\n</think>")
    thoughts = segment_thoughts(ids, tok)
    assert [t.text for t in thoughts] == ["B."]
    assert tok.decode([ids[thoughts[0].position]]) == " \n\n"


def test_split_thoughts_matches_token_level(tok):
    texts = [TRACE, "<think>\nA.\n\nB is 3.\n\nWait, so", "A.\n\nB.\n\n</think>\nX.\n\nY.",
             "x.\n\ny.\n\n<think>\nP.\n\nQ.\n\nR.\n\n</think>\n\nZ.", "no delimiter"]
    for text in texts:
        assert split_thoughts(text) == [t.text for t in segment_thoughts(enc(tok, text), tok)]
        assert split_thoughts(text, think_only=False) == [
            t.text for t in segment_thoughts(enc(tok, text), tok, think_only=False)]
    assert split_thoughts("x.\n\ny.\n\n<think>\nP.\n\nQ.\n\nR.\n\n</think>\n\nZ.") == ["Q.", "R."]


@pytest.mark.parametrize("text,label", [
    ("Wait, alternatively we could add.", "reflection"),  # reflection is tested first
    ("wait. 3 + 4 = 7", "reflection"),
    ("Waiting times add up to 7.", "execution"),  # "Wait" must be a whole word
    ("Let me verify: 7 - 4 = 3.", "reflection"),
    ("We should make sure the units match.", "reflection"),
    ("Hold on, that is off by one.", "reflection"),
    ("I need to THINK AGAIN about this.", "reflection"),
    ("That's correct.", "reflection"),
    ("That\u2019s incorrect, the sum is 8.", "reflection"),
    ("Let me check the carry.", "reflection"),
    ("This seems right.", "reflection"),
    ("Alternatively, count up from 4.", "transition"),
    ("Another way to see it: 12 - 5 = 7.", "transition"),
    ("Let's think differently.", "transition"),
    ("Try another approach with fractions.", "transition"),
    ("Another method, another solution, another strategy.", "transition"),
    ("Use another technique, then verify.", "reflection"),  # both: reflection wins
    ("So 3 + 4 = 7.", "execution"),
    ("Alternative numbers give 8.", "execution"),
    ("", "execution"),
])
def test_seal_labels(text, label):
    assert label_thought(text) == label
    assert label in LABELS


def test_label_rules_are_configurable(tok):
    transition_first = LabelRules(order=("transition", "reflection"))
    assert label_thought("Wait, alternatively we could add.", transition_first) == "reflection"
    assert label_thought("Wait, another way.", transition_first) == "transition"
    assert label_thought("Wait, another way.", SEAL_RULES) == "reflection"
    custom = LabelRules(reflection_starts=("hmm",), reflection_keywords=("double-check",))
    assert label_thought("Hmm, 7.", custom) == "reflection"
    assert label_thought("Wait, 7.", custom) == "execution"
    with pytest.raises(ValueError, match="unknown label"):
        LabelRules(order=("reflection", "planning"))
    # any callable replaces the classifier (e.g. an LLM labeller)
    ids = enc(tok, TRACE)
    labels = [t.label for t in segment_thoughts(ids, tok, labeler=lambda s: f"len{len(s)}")]
    assert labels == ["len13", "len29", "len19"]
    assert [t.label for t in segment_thoughts(ids, tok, labeler=transition_first)] == [
        "execution", "reflection", "transition"]


def test_stats(tok):
    thoughts = segment_thoughts(enc(tok, TRACE), tok)
    stats = thought_stats(thoughts)
    assert stats["n_thoughts"] == 3
    assert stats["counts"] == {"execution": 1, "reflection": 1, "transition": 1}
    assert stats["tokens"] == {label: t.n_tokens for label, t in
                               zip(LABELS, thoughts, strict=True)}
    assert stats["n_tokens"] == sum(t.n_tokens for t in thoughts)
    assert count_by_label(["reflection", "reflection"]) == {
        "execution": 0, "reflection": 2, "transition": 0}
    assert thought_stats([])["counts"] == {"execution": 0, "reflection": 0, "transition": 0}


def test_think_region_predicate(tok):
    pred = think_region_predicate(tok)
    ids = enc(tok, TRACE)
    hits = [i for i in range(1, len(ids) + 1) if pred(ids[:i])]
    # exactly the delimiters inside <think> (including the one whose thought is empty)
    close = ids.index(think_token_ids(tok)[1])
    open_ = ids.index(think_token_ids(tok)[0])
    expected = [i + 1 for i in range(len(ids)) if ids[i] in delimiter_token_ids(tok)
                and open_ < i < close]
    assert hits == expected and len(hits) == 4
    assert not pred([]) and not pred(enc(tok, "A.\n\n"))  # never opened


def test_tokenizer_without_delimiter_fails_clearly(tmp_path):
    from lens_steer.tokenization import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["abc def ghi. " * 50], tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match="no token whose text contains"):
        delimiter_token_ids(tok)


# -- issue 18.4: official labeller, consecutive delimiters, added tokens, whole-generation rule ----
QWEN2 = "/work/shared/data/tokenizers/qwen2"


@pytest.fixture()
def qwen2():
    import os

    if not os.path.isdir(QWEN2):
        pytest.skip("needs ../shared/data/tokenizers/qwen2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN2)  # a fresh object: tests add tokens to it


@pytest.mark.parametrize("text,corrected,official", [
    ("Let's think differently.", "transition", "execution"),   # the official typo
    ("Let me think differenly.", "execution", "transition"),
    ("Waiting for the sum.", "execution", "reflection"),         # plain prefix
    ("Wait, 2+2=4.", "reflection", "reflection"),
    ("That\u2019s correct.", "reflection", "execution"),           # curly apostrophe
    ("", "execution", "execution"),
])
def test_official_labeller_differs_where_documented(text, corrected, official):
    from lens_steer.registry import LABELLERS

    assert LABELLERS.get("seal")(text) == corrected
    assert LABELLERS.get("seal-official")(text) == official


def test_labelers_alias_is_the_registry():
    from lens_steer.registry import LABELLERS
    from lens_steer.thoughts import LABELERS, resolve_labeler

    assert set(LABELERS) >= {"seal", "seal-official"} and "seal" in LABELLERS
    LABELERS["upper"] = str.upper
    try:
        assert LABELLERS.get("upper") is str.upper and resolve_labeler("upper") is str.upper
    finally:
        del LABELERS["upper"]
    with pytest.raises(ValueError, match="seal-official"):
        resolve_labeler("nope")


def test_consecutive_delimiters_enclose_an_empty_thought(qwen2):
    qwen2.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    ids = enc(qwen2, "<think>\nA.\n\n------\n\nB.\n\nWait, C.\n\n</think>")
    texts = [t.text for t in segment_thoughts(ids, qwen2)]
    assert texts == ["B.", "Wait, C."]  # no "------" thought
    official = segment_thoughts(ids, qwen2, labeler="seal-official")
    assert [(t.text, t.label) for t in official] == [
        ("", "execution"), ("B", "execution"), ("Wait, C", "reflection"), ("", "execution")]


def test_think_tokens_added_after_first_use_are_seen(qwen2):
    ids = enc(qwen2, "<think>\nA.\n\nB.\n\n</think>\nC.\n\nD.")
    assert think_token_ids(qwen2) == (None, None)
    everything = [t.text for t in segment_thoughts(ids, qwen2)]
    assert everything == ["B.", "</think>\nC.", "D."]
    qwen2.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    open_id, close_id = think_token_ids(qwen2)
    assert open_id == qwen2.convert_tokens_to_ids("<think>") and close_id is not None
    ids = enc(qwen2, "<think>\nA.\n\nB.\n\n</think>\nC.\n\nD.")
    assert [t.text for t in segment_thoughts(ids, qwen2)] == ["B."]


def test_whole_generation_rule_for_models_without_think(qwen2):
    with pytest.raises(ValueError, match="region='all'"):
        think_region_predicate(qwen2)
    pred = think_region_predicate(qwen2, region="all")
    assert think_region_predicate(qwen2, region="auto")(enc(qwen2, "A.\n\n"))
    ids = enc(qwen2, "Sum it.\n\nWait, check.\n\nDone")
    hits = [i for i in range(1, len(ids) + 1) if pred(ids[:i])]
    assert hits == [i + 1 for i in range(len(ids)) if ids[i] in delimiter_token_ids(qwen2)]
    assert len(hits) == 2


def test_require_thoughts_names_the_trace():
    from lens_steer.errors import DataError
    from lens_steer.thoughts import require_thoughts

    with pytest.raises(DataError, match="traces.jsonl:3"):
        require_thoughts([], "traces.jsonl:3")
