"""`gspo validate` checks what can be checked without loading a model, and `gspo train` runs the same checks
first: exit 2, one `error:` line per problem naming the key (and file, line), no traceback."""

from __future__ import annotations

import os

import pytest
import yaml

from gspo.cli import main

pytestmark = pytest.mark.timeout(120)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = os.path.join(REPO, "recipes", "tiny", "reasoning_rl.yaml")


def write_config(tmp_path, rows=None, raw=None, reward="my_reward.py:needs_solution", **top):
    (tmp_path / "my_reward.py").write_text(
        "def needs_solution(prompts, completions, solution, **kwargs):\n"
        "    return [float(s in c) for s, c in zip(solution, completions)]\n")
    data = {"task": "add", "num_samples": 8}
    if rows is not None or raw is not None:
        import json

        text = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows)
        (tmp_path / "data.jsonl").write_text(text)
        data = {"path": str(tmp_path / "data.jsonl")}
    cfg = {"model": {"name_or_path": "tiny:qwen3_moe"}, "data": data,
           "rollout": {"engine": "hf_generate", "group_size": 2, "prompts_per_step": 2},
           "algorithm": {"num_minibatches": 1}, "rewards": [reward],
           "output_dir": str(tmp_path / "out"), **top}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def validate(capsys, *args):
    code = main(["validate", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


GOOD_ROWS = [{"prompt": "1+1?", "solution": "2"}, {"prompt": "2+2?", "solution": "4"}]


def test_a_good_config_passes(tmp_path, capsys):
    code, out, err = validate(capsys, write_config(tmp_path, rows=GOOD_ROWS))
    assert code == 0 and "config OK" in out, err


@pytest.mark.parametrize("case,expected", [
    ("missing_model", "model.name_or_path: model folder"),
    ("empty_jsonl", "data.path: data: no rows"),
    ("malformed_jsonl", "data.jsonl:2: not valid JSON"),
    ("no_prompt_column", "no column 'prompt'"),
    ("reward_cannot_take_columns", "parameter 'solution'"),
    ("output_dir_is_a_file", "is a file"),
    ("output_dir_under_a_file", "is a file, not a folder"),
    ("resume_latest_without_checkpoint", "resume_from: `latest` but"),
])
def test_each_problem_is_one_line_with_exit_2(tmp_path, capsys, case, expected):
    over: list[str] = []
    kw: dict = {"rows": GOOD_ROWS}
    if case == "missing_model":
        over = [f"model.name_or_path={tmp_path}/runs/cold_start/final"]
    elif case == "empty_jsonl":
        kw = {"raw": "\n"}
    elif case == "malformed_jsonl":
        kw = {"raw": '{"prompt": "a", "solution": "1"}\n{"prompt": "b", solution\n'}
    elif case == "no_prompt_column":
        kw = {"rows": [{"question": "1+1?", "solution": "2"}]}
    elif case == "reward_cannot_take_columns":
        kw = {"rows": [{"prompt": "1+1?", "answer": "2"}]}
    elif case == "output_dir_is_a_file":
        (tmp_path / "f").write_text("")
        over = [f"output_dir={tmp_path}/f"]
    elif case == "output_dir_under_a_file":
        (tmp_path / "f").write_text("")
        over = [f"output_dir={tmp_path}/f/run"]
    elif case == "resume_latest_without_checkpoint":
        over = ["resume_from=latest"]
    path = write_config(tmp_path, **kw)
    code, out, err = validate(capsys, path, *over)
    assert code == 2 and "config OK" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    # `gspo train` refuses the same way, before any model loads.
    assert main(["train", path, *over]) == 2
    assert expected in capsys.readouterr().err


def test_hub_id_is_said_so(tmp_path, capsys):
    code, out, _ = validate(capsys, write_config(tmp_path, rows=GOOD_ROWS), "model.name_or_path=Qwen/Qwen3-0.6B")
    assert code == 0 and "treated as a Hugging Face Hub id" in out


def test_readme_use_examples_run_as_written_after_the_demo(capsys, monkeypatch):
    """Every `gspo` line of the README's "Use" block, in order after the demo (`gspo pipeline
    recipes/tiny/pipeline.yaml`), starts from a model that exists by then: tiny:, the demo's stage outputs, or
    the output of an earlier line. The issue's case: `gspo train recipes/tiny/reasoning_rl.yaml` first, before
    anything wrote runs/tiny/cold_start/final."""
    import shlex

    from gspo.config import load_config
    from gspo.pipeline import load_pipeline

    monkeypatch.chdir(REPO)
    code, _, err = validate(capsys, RL, "model.name_or_path=runs/tiny/nowhere/final")
    assert code == 2 and "model.name_or_path: model folder 'runs/tiny/nowhere/final' does not exist" in err
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = readme[readme.index("## Use"):readme.index("## Status")]
    block = block[block.index("```bash"):block.index("```", block.index("```bash") + 3)]
    demo = load_pipeline("recipes/tiny/pipeline.yaml")
    exists = {os.path.normpath(os.path.join(demo.output_dir, s.name, "final")) for s in demo.stages}
    lines = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("gspo ")]
    assert len(lines) >= 5
    for words in lines:
        command, *rest = words[1:]
        if command == "env":  # takes no config
            continue
        config, *rest = rest
        args = [w for w in rest if "=" in w]
        if command == "pipeline":
            if any(a.startswith("stages.") for a in args):  # changes a stage the demo finished
                assert "--rerun" in rest, words
            continue
        cfg = load_config(config, args, validate=False)
        model = cfg.model.name_or_path
        assert model.startswith("tiny:") or os.path.normpath(model) in exists, (words, model)
        if command == "train":
            exists.add(os.path.normpath(os.path.join(cfg.output_dir, "final")))


def test_relative_paths_resolve_next_to_the_config_then_the_cwd_logged(tmp_path, monkeypatch, caplog):
    """One rule for data files, model folders and reward files: the config's folder first, then the cwd."""
    from gspo.config import load_config

    recipe = tmp_path / "recipe"
    recipe.mkdir()
    write_config(recipe, rows=GOOD_ROWS)
    cfg = yaml.safe_load((recipe / "cfg.yaml").read_text())
    cfg["data"]["path"] = "data.jsonl"  # next to the config, not in the cwd
    cfg["rewards"] = ["my_reward.py:needs_solution"]
    (recipe / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.jsonl").write_text('{"prompt": "wrong file", "solution": "0"}\n')
    monkeypatch.chdir(elsewhere)
    loaded = load_config(str(recipe / "cfg.yaml"))
    assert loaded.data.path == str(recipe / "data.jsonl")  # the config's folder wins over the cwd
    # Only in the cwd: used, and the fallback is logged.
    os.remove(recipe / "data.jsonl")
    with caplog.at_level("INFO", logger="gspo"):
        loaded = load_config(str(recipe / "cfg.yaml"))
    assert loaded.data.path == "data.jsonl"
    assert any("data.path" in r.getMessage() and "current directory" in r.getMessage() for r in caplog.records)


def test_pipeline_validation_runs_the_same_file_checks_per_stage(tmp_path, capsys):
    path = write_config(tmp_path, raw='{"prompt": "a", "solution": "1"}\n{"prompt": \n')
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"name": "p", "output_dir": str(tmp_path / "runs"),
                                    "stages": [{"name": "rl", "config": path}]}))
    code, out, err = validate(capsys, str(pipe))
    assert code == 2 and "pipeline OK" not in out
    assert "stage 'rl'" in err and "data.jsonl:2: not valid JSON" in err
