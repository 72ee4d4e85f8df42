"""Built-in rewards: math accuracy (with its traps), format, length and language rewards. Table-driven."""

import itertools
import threading

import pytest
from gspo_rewards import format as fmt
from gspo_rewards import language, length
from gspo_rewards import math as mathr


def one(fn, completion, **columns_and_kwargs):
    return fn(["prompt"], [completion], [[1] * 5], **{k: ([v] if k in ("answer",) else v)
                                                      for k, v in columns_and_kwargs.items()})[0]


# ------------------------------------------------------------------------------------------------- math

MATH_CASES = [
    ("42", "The answer is \\boxed{42}.", 1.0),
    ("\\frac{1}{2}", "so \\boxed{0.5}", 1.0),
    ("1/2", "the result is $\\frac{1}{2}$", 1.0),
    ("$\\sqrt{2}$", "\\boxed{\\sqrt{2}}", 1.0),
    ("x^2+1", "\\boxed{1 + x^2}", 1.0),
    ("42", "<think>6*7</think><answer>42</answer>", 1.0),
    ("3", "first I thought 1/2, then \\boxed{3}", 1.0),
    ("3", "\\boxed{4}", 0.0),
    ("7", "<answer>8</answer>", 0.0),
    ("3", "I do not know", 0.0),
    ("\\boxed{10}", "\\boxed{10}", 1.0),
]


@pytest.mark.parametrize("gold,completion,expected", MATH_CASES)
def test_math_accuracy_table(gold, completion, expected):
    assert one(mathr.math_accuracy, completion, answer=gold) == expected


@pytest.mark.parametrize("gold", ["banana", "", None, "\\text{no idea}", "see the figure"])
@pytest.mark.parametrize("completion", ["banana", "\\boxed{banana}", "", "\\boxed{0}"])
def test_unparseable_gold_abstains_never_scores(gold, completion):
    assert one(mathr.math_accuracy, completion, answer=gold) is None


def test_gold_is_passed_as_gold_not_swapped():
    from math_verify import parse, verify

    interval, inequality = parse("$(1,2)$"), parse("$1<x<2$")
    # The pair is asymmetric in math-verify, so it detects a swapped call.
    assert verify(inequality, interval) and not verify(interval, inequality)
    assert one(mathr.math_accuracy, "\\boxed{(1,2)}", answer="1<x<2") == 1.0  # verify(gold=inequality, ...)
    assert one(mathr.math_accuracy, "\\boxed{1<x<2}", answer="(1,2)") == 0.0  # swapped would say 1.0


def test_each_distinct_gold_is_parsed_once():
    mathr.parse_gold.cache_clear()
    golds = ["12", "12", "12", "7", "7", "12"]
    out = mathr.math_accuracy(["p"] * 6, ["\\boxed{12}"] * 6, answer=golds)
    assert out == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert mathr.parse_gold.cache_info().misses == 2


def test_math_accuracy_works_off_the_main_thread():
    # math-verify's signal-based time-outs raise in worker threads; the reward must still score there.
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=mathr.math_accuracy(["p"] * 2, ["\\boxed{2}", "\\boxed{3}"], answer=["2", "2"])))
    thread.start()
    thread.join(60)
    assert result["out"] == [1.0, 0.0]


def test_answer_column_is_configurable():
    assert mathr.math_accuracy(["p"], ["\\boxed{5}"], solution=["5"], answer_column="solution") == [1.0]


# ----------------------------------------------------------------------------------------------- format

FORMAT_CASES = [
    # completion, strict, soft, tag_count
    ("<think>2+2=4</think><answer>4</answer>", 1.0, 1.0, 1.0),
    ("<think>\n2+2=4\n</think>\n<answer>\n4\n</answer>\n", 1.0, 1.0, 1.0),
    ("Sure! <think>x</think> then <answer>4</answer>", 0.0, 1.0, 1.0),
    ("<think>x</think><answer>4</answer> and more text", 0.0, 1.0, 1.0),
    ("<answer>4</answer><think>x</think>", 0.0, 0.0, 0.5),
    ("<think>x</think><think>y</think><answer>4</answer>", 0.0, 1.0, 0.5),
    ("<think>x</think>4", 0.0, 0.0, 0.5),
    ("4", 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("completion,strict,soft,count", FORMAT_CASES)
def test_format_rewards_table(completion, strict, soft, count):
    assert one(fmt.format_strict, completion) == strict
    assert one(fmt.format_soft, completion) == soft
    assert one(fmt.tag_count, completion) == count
    assert strict <= soft  # strict implies soft


def test_format_tags_are_configurable():
    text = "<reasoning>x</reasoning><solution>4</solution>"
    tags = {"think_tag": "reasoning", "answer_tag": "solution"}
    assert (one(fmt.format_strict, text, **tags), one(fmt.tag_count, text, **tags)) == (1.0, 1.0)
    assert (one(fmt.format_strict, text), one(fmt.tag_count, text)) == (0.0, 0.0)


# ----------------------------------------------------------------------------------------------- length


@pytest.mark.parametrize("n,expected", [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (100, -1.0), (150, -1.0)])
def test_soft_overlong_table(n, expected):
    # DAPO: 0 up to L_max - L_cache = 80, then (80 - n) / 20, then -1.
    out = length.overlong_penalty(["p"], ["c"], [[7] * n], max_length=100, cache_length=20)
    assert out[0] == pytest.approx(expected)


def test_soft_overlong_is_monotone_and_validates():
    values = [length.soft_overlong(n, 64, 16) for n in range(80)]
    assert all(a >= b for a, b in itertools.pairwise(values)) and min(values) == -1.0 and max(values) == 0.0
    with pytest.raises(ValueError, match="cache_length"):
        length.soft_overlong(10, 64, 100)


def test_cosine_length_orders_correct_and_wrong_answers():
    lengths = [1, 20, 50, 80, 99]
    right = [length.cosine_length(["q"], ["\\boxed{4}"], [[1] * n], max_length=100, answer=["4"])[0] for n in lengths]
    wrong = [length.cosine_length(["q"], ["\\boxed{5}"], [[1] * n], max_length=100, answer=["4"])[0] for n in lengths]
    assert all(a > b for a, b in itertools.pairwise(right))  # correct: shorter earns more
    assert all(a < b for a, b in itertools.pairwise(wrong))  # wrong: longer is penalized less
    assert min(right) > max(wrong)  # any correct answer beats any wrong one
    over = length.cosine_length(["q"], ["\\boxed{4}"], [[1] * 100], max_length=100, answer=["4"], exceed_penalty=-2.0)
    assert over == [-2.0]
    assert length.cosine_length(["q"], ["\\boxed{4}"], [[1]], max_length=100, answer=["banana"]) == [None]


@pytest.mark.parametrize("text,expected", [
    ("one two three four five six", 0.0),
    ("", 0.0),
    ("a b", 0.0),  # shorter than one 3-gram
    ("x y z x y z", -0.25),  # 4 trigrams, 3 distinct
    ("go go go go go go go go go go", -0.875),  # 8 trigrams, 1 distinct
])
def test_repetition_penalty_table(text, expected):
    assert one(length.repetition_penalty, text) == pytest.approx(expected)


def test_repetition_penalty_grows_with_repetition():
    texts = ["a b c d e f g h", "a b c a b c g h", "a b c a b c a b"]
    values = [one(length.repetition_penalty, t) for t in texts]
    assert values[0] > values[1] > values[2]


# --------------------------------------------------------------------------------------------- language

LANGUAGE_CASES = [
    ("The answer is four.", "latin", "word", 1.0),
    ("答案是四", "cjk", "word", 1.0),
    ("答案是四", "latin", "word", 0.0),
    ("The answer 是 4", "latin", "word", 2 / 3),  # digits carry no script
    ("Ответ: four", "cyrillic", "word", 0.5),
    ("ab 中", "latin", "char", 2 / 3),
    ("1 + 2 = 3", "latin", "word", None),  # nothing to judge: abstain
]


@pytest.mark.parametrize("text,target,unit,expected", LANGUAGE_CASES)
def test_language_consistency_table(text, target, unit, expected):
    got = one(language.language_consistency, text, target=target, unit=unit)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_language_consistency_reads_the_tag_and_validates():
    text = "<think>先算 two plus two</think><answer>4</answer>"
    assert one(language.language_consistency, text, target="latin", tag="think") == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="latin"):
        one(language.language_consistency, text, target="klingon")
