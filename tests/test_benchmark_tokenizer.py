"""The benchmarks' word-level tokenizer: one token per word, special tokens never split out of a word.

Named `w1` / `w2`, the pad and eos tokens were cut out of every word starting with them ("w1792" -> pad, unk), so
benchmark prompts held pad tokens as real tokens; with a config-built model's all-zero pad embedding that made a
24-layer model's gradients overflow (benchmarks/gpu_gspo_vs_trl.py `word_tokenizer` says how)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from gpu_gspo_vs_trl import prompts, word_tokenizer

pytestmark = pytest.mark.timeout(60)


def test_one_token_per_word_and_no_special_token_inside_a_prompt():
    tok = word_tokenizer(151936)
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("w1792 w2124 w10 w3", add_special_tokens=False)["input_ids"] == [1792, 2124, 10, 3]
    for p in prompts()[:64]:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(p.split()) == 64
        assert min(ids) >= 3  # no unk / pad / eos among the prompt's tokens


def test_decoding_skips_the_special_tokens():
    tok = word_tokenizer(100)
    ids = tok("w5 w6 <eos>", add_special_tokens=False)["input_ids"]
    assert ids == [5, 6, 2]
    assert tok.decode(ids, skip_special_tokens=True) == "w5 w6"
