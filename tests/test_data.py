"""Prompt datasets and the resumable sampler."""

import json

import pytest

from gspo.data import AddTask, PromptSampler, build_dataset, load_rows
from gspo.registry import TASKS


class _DataCfg:
    def __init__(self, **kw):
        self.task, self.path, self.split, self.prompt_column = None, None, "train", "prompt"
        self.num_samples, self.shuffle, self.task_kwargs = 64, True, {}
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
