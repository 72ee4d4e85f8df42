"""Prompt datasets and the resumable sampler."""

import json

import pytest

from gspo.data import (
    AddTask,
    PromptSampler,
    build_dataset,
    describe_prompt_format,
    load_rows,
    prompt_token_ids,
)
from gspo.registry import TASKS


class _DataCfg:
    def __init__(self, **kw):
        self.task, self.path, self.split, self.prompt_column = None, None, "train", "prompt"
        self.num_samples, self.shuffle, self.task_kwargs = 64, True, {}
        self.chat_template, self.name, self.revision = "auto", None, None
        self.__dict__.update(kw)


def test_sampler_batches_are_distinct_within_an_epoch_and_cover_it():
    s = PromptSampler(10, 3, seed=0)
    seen = [i for _ in range(3) for i in s.next_indices()]
    assert len(seen) == len(set(seen)) == 9  # the tail (1 row) is dropped, never mixed with the next epoch
    assert len(set(s.next_indices())) == 3 and s.epoch == 1


def test_sampler_resumes_exactly():
    a = PromptSampler(50, 4, seed=3)
    for _ in range(7):
        a.next_indices()
    b = PromptSampler(50, 4, seed=3)
    b.load_state_dict(a.state_dict())
    assert [a.next_indices() for _ in range(30)] == [b.next_indices() for _ in range(30)]


def test_sampler_epochs_are_reshuffled_and_seed_dependent():
    s = PromptSampler(20, 20, seed=0)
    assert s.next_indices() != s.next_indices()
    assert PromptSampler(20, 20, seed=0).next_indices() != PromptSampler(20, 20, seed=1).next_indices()


def test_sampler_rejects_too_small_dataset():
    with pytest.raises(ValueError, match="prompts_per_step"):
        PromptSampler(3, 4, seed=0)


def test_add_task_answers_are_correct_sums():
    rows = AddTask(digits=2).rows(200, seed=1)
    for r in rows:
        a, b = r["prompt"][len("What is "):-1].split("+")
        assert int(r["answer"]) == int(a) + int(b)
    assert "add" in TASKS
    sft = AddTask(think=True).sft_rows(5, seed=0)
    assert all(r["completion"].endswith(f"<answer>{r['answer']}</answer>") for r in sft)


def test_jsonl_dataset_and_prompt_column(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(5)) + "\n")
    ds = build_dataset(_DataCfg(path=str(p), prompt_column="question"), seed=0)
    assert ds.columns == ["answer", "prompt"] and ds.rows[2]["prompt"] == "q2"
    with pytest.raises(ValueError, match="data.prompt_column"):
        build_dataset(_DataCfg(path=str(p), prompt_column="nope"), seed=0)


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_rows(str(p))


# --- data.chat_template ------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def tok():
    from gspo.models.loading import build_tokenizer

    return build_tokenizer()


def test_chat_template_auto_follows_trl_formats(tok):
    """auto: a plain string is the user's text exactly (TRL's standard format, no special tokens added);
    a list of messages goes through the template (TRL's conversational format)."""
    plain = prompt_token_ids(tok, "What is 2+3?", "auto")
    assert plain == tok("What is 2+3?", add_special_tokens=False)["input_ids"]
    assert "<|im_start|>" not in tok.decode(plain)
    templated = tok.decode(prompt_token_ids(tok, MESSAGES, "auto"))
    assert templated.startswith("<|im_start|>user") and templated.endswith("<|im_start|>assistant\n")
    # always: the string becomes one user turn, the same ids as the explicit conversation
    assert prompt_token_ids(tok, "What is 2+3?", "always") == prompt_token_ids(tok, MESSAGES, "auto")
    assert prompt_token_ids(tok, "What is 2+3?", "never") == plain


def test_chat_template_never_refuses_conversational_rows_naming_the_row_and_key(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "plain"}) + "\n" + json.dumps({"prompt": MESSAGES}) + "\n")
    with pytest.raises(ValueError, match=r"data row 1: .*data.chat_template=never"):
        build_dataset(_DataCfg(path=str(path), chat_template="never"), seed=0)
    assert len(build_dataset(_DataCfg(path=str(path), chat_template="auto"), seed=0)) == 2


def test_chat_template_needs_a_template_when_one_is_asked_for(tok):
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*data.chat_template=never"):
        prompt_token_ids(bare, "hi", "always")
    assert prompt_token_ids(bare, "hi", "auto") == tok("hi", add_special_tokens=False)["input_ids"]


def test_prompt_format_line_names_the_choice_and_shows_a_rendered_prompt(tok):
    rows = [{"prompt": "What is 2+3?"}, {"prompt": MESSAGES}]
    line = describe_prompt_format(rows[:1], "auto", tok)
    assert line.startswith("data.chat_template=auto: no chat template") and "'What is 2+3?'" in line
    assert "chat template on every prompt" in describe_prompt_format(rows[:1], "always", tok)
    assert "<|im_start|>user" in describe_prompt_format(rows[:1], "always", tok)
    assert "on 1 of 2 prompts" in describe_prompt_format(rows, "auto", tok)


# --- Hugging Face dataset configuration, split, revision ----------------------------------------------------


def _two_config_dataset(root):
    """A local dataset repository with two configurations (README `configs:` metadata, as on the Hub)."""
    root.mkdir()
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: easy\n  data_files:\n  - split: train\n    path: easy.jsonl\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard_train.jsonl\n"
        "  - split: test\n    path: hard_test.jsonl\n---\n")
    for name, prompts in (("easy", ["1+1"]), ("hard_train", ["99+99", "98+97"]), ("hard_test", ["77+77"])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(root)


def test_hf_dataset_configuration_name_and_split(tmp_path):
    path = _two_config_dataset(tmp_path / "ds")
    assert [r["prompt"] for r in build_dataset(_DataCfg(path=path, name="easy"), seed=0).rows] == ["1+1"]
    assert [r["prompt"] for r in build_dataset(_DataCfg(path=path, name="hard"), seed=0).rows] == ["99+99", "98+97"]
    assert [r["prompt"] for r in build_dataset(_DataCfg(path=path, name="hard", split="test"), seed=0).rows] == \
        ["77+77"]


def test_hf_dataset_revision_reaches_load_dataset(tmp_path, monkeypatch):
    """A revision only means something on the Hub (no network here): check it is passed through, next to
    name and split, to `datasets.load_dataset`."""
    import datasets

    seen = {}

    def load_dataset(path, **kwargs):
        seen.update(kwargs, path=path)
        return datasets.Dataset.from_list([{"prompt": "x"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    build_dataset(_DataCfg(path="org/name", name="main", split="test", revision="abc123"), seed=0)
    assert seen == {"path": "org/name", "name": "main", "split": "test", "revision": "abc123"}
