"""Train a byte-level BPE tokenizer with Qwen2's pre-tokenisation, saved as a HF directory.

Digits are split one by one and punctuation is merged with following newlines, so `.\\n\\n`
becomes one token as in Qwen2's vocabulary. Load the result with `PreTrainedTokenizerFast`
(AutoTokenizer on a Qwen2 folder would pick `Qwen2Tokenizer` and re-split differently).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_bpe_tokenizer(corpus: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1024,
                        extra_special_tokens: Iterable[str] = ("<think>", "</think>")):
    """Train on `corpus`, save to `out_dir`, and return the tokenizer reloaded from there.

    EOS is `<|endoftext|>`, the pad token `<|pad|>` is distinct from it; padding is on the left
    (batched generation). There is no BOS token, as in Qwen2.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = list(extra_special_tokens)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD, *extra], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left",
        additional_special_tokens=extra,
    )
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)
