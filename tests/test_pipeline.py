"""`gspo pipeline`: wiring, stage-targeted overrides, manifest, resume after a kill, refusing a changed stage.

The end-to-end runs are real: tiny MoE, TRL SFT, the GSPO trainer (HF generate rollouts to stay fast), each
pipeline in a subprocess of the `gspo` command: one SIGKILLed while its last stage (alignment RL) runs and
resumed from that stage's checkpoint, one SIGKILLed in stage 3 (rejection-sampling SFT) and restarted there.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from gspo.config import ConfigError
from gspo.pipeline import load_pipeline, resolve_stages, split_overrides

# Whole pipelines in subprocesses: the module fixture takes 73 s and the stage-3 kill test 60 s on an idle
# 2-core machine (the subprocesses have their own 300-400 s limits).
pytestmark = pytest.mark.timeout(1200)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny")
FAST_RL = ["rollout.engine=hf_generate", "rollout.prompts_per_step=4", "train.save_every=1",
           "logging.progress=false"]


def write_pipeline(path, stages, output_dir):
    path.write_text(yaml.safe_dump({"name": "test", "output_dir": str(output_dir), "stages": stages}))
    return str(path)


def three_stages(polish_rollouts=3):
    """cold start -> reasoning RL -> a second RL stage: stage 3 starts from stage 2, which starts from stage 1."""
    return [
        {"name": "cold_start", "config": os.path.join(TINY, "cold_start.yaml"),
         "overrides": ["sft.max_steps=12", "logging.log_every=2", "logging.progress=false"]},
        {"name": "reasoning_rl", "config": os.path.join(TINY, "reasoning_rl.yaml"),
         "overrides": [*FAST_RL, "train.num_rollouts=3"]},
        {"name": "polish_rl", "config": os.path.join(TINY, "reasoning_rl.yaml"),
         "overrides": [*FAST_RL, f"train.num_rollouts={polish_rollouts}"]},
    ]


# Until gspo.plugins lists them as built-ins, the two newer stage types are loaded as the configs' plugins.
STAGE_PLUGINS = "plugins=[gspo.training.rejection,gspo.training.reward_model]"


def four_stages(alignment_rollouts):
    """The tiny recipes' four stages, shortened, after the reward model (which every eval scores with)."""
    return [
        {"name": "reward_model", "config": os.path.join(TINY, "reward_model.yaml"),
         "overrides": ["reward_model.max_steps=4", "data.num_samples=128", "logging.progress=false",
                       STAGE_PLUGINS]},
        {"name": "cold_start", "config": os.path.join(TINY, "cold_start.yaml"), "eval": True,
         "overrides": ["sft.max_steps=12", "logging.log_every=2", "logging.progress=false",
                       "data.task_kwargs.think=true"]},
        {"name": "reasoning_rl", "config": os.path.join(TINY, "reasoning_rl.yaml"),
         "overrides": [*FAST_RL, "train.num_rollouts=3"]},
        {"name": "rejection_sampling", "config": os.path.join(TINY, "rejection_sampling.yaml"),
         "overrides": ["rollout.engine=hf_generate", "data.num_samples=16", "rejection.min_reward=1.0",
                       STAGE_PLUGINS]},
        {"name": "rs_sft", "config": os.path.join(TINY, "cold_start.yaml"),
         "overrides": ["sft.max_steps=4", "logging.log_every=2", "logging.progress=false"]},
        {"name": "alignment_rl", "config": os.path.join(TINY, "alignment_rl.yaml"), "eval": True,
         "overrides": [*FAST_RL, f"train.num_rollouts={alignment_rollouts}"]},
    ]


def write_four_stage_pipeline(path, output_dir, alignment_rollouts):
    path.write_text(yaml.safe_dump({
        "name": "tiny-short", "output_dir": str(output_dir),
        "eval": {"config": os.path.join(TINY, "eval.yaml"),
                 "overrides": ["rollout.engine=hf_generate", "eval.num_prompts=8", "eval.num_samples=2",
                               "eval.k=[1,2]"]},
        "stages": four_stages(alignment_rollouts)}))
    return str(path)


def gspo(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "gspo", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def manifest(out):
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        return {s["name"]: s for s in json.load(f)["stages"]}


def loaded_from(model_dir):
    """The checkpoint the stage actually loaded (every save records it in gspo_model.json; config.json stays
    the architecture's own, with no gspo_* attribute)."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        assert not [k for k in json.load(f) if k.startswith("gspo")]
    with open(os.path.join(model_dir, "gspo_model.json"), encoding="utf-8") as f:
        return json.load(f)["loaded_from"]


def tree_mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


ROLLOUTS = 40
LAST = "alignment_rl"
EARLIER = ("reward_model", "cold_start", "reasoning_rl", "rejection_sampling", "rs_sft")


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """Run the shortened four-stage pipeline, SIGKILL it once its last stage (alignment RL) has a checkpoint,
    then run the same command again.

    The subprocess runs in an empty directory: the recipes' own relative model paths (runs/tiny/...) do not
    exist there, so a stage only finds its model through the pipeline's wiring.
    """
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "out"
    pipe = write_four_stage_pipeline(tmp / "pipe.yaml", out, alignment_rollouts=ROLLOUTS)
    proc = gspo("pipeline", pipe, cwd=tmp)
    latest = out / LAST / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists():
        if proc.poll() is not None:
            pytest.fail(f"the pipeline ended before its last stage had a checkpoint:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the last stage wrote no checkpoint within 240 s")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = manifest(out)
    mtimes = {s: tree_mtimes(out / s) for s in EARLIER}
    killed_at = int(latest.read_text().split("-")[1])
    second = gspo("pipeline", pipe, cwd=tmp)
    log, _ = second.communicate(timeout=400)
    assert second.returncode == 0, log[-3000:]
    return {"out": out, "pipe": pipe, "before": before, "after": manifest(out), "log": log, "mtimes": mtimes,
            "killed_at": killed_at, "tmp": tmp}


def test_each_stage_consumes_the_previous_stage_output(killed_then_resumed):
    out, after = killed_then_resumed["out"], killed_then_resumed["after"]
    assert list(after) == [*EARLIER, LAST] and all(s["status"] == "done" for s in after.values())
    rm, cold, rl, rs, rs_sft, align = (after[n] for n in after)
    assert cold["output"] == str(out / "cold_start" / "final")
    # The wiring is explicit in the manifest and is what each stage ran with ...
    assert rl["wiring"]["model.name_or_path"] == {"from": "cold_start", "value": cold["output"]}
    assert rl["config"]["model"]["name_or_path"] == cold["output"]
    assert rs["config"]["model"]["name_or_path"] == rl["output"] and rs["output"].endswith("data.jsonl")
    assert rs_sft["config"]["data"]["path"] == rs["output"] and rs_sft["config"]["data"]["task"] is None
    assert align["config"]["rewards"][1]["kwargs"]["model_path"] == rm["output"]
    assert align["wiring"]["model.name_or_path"]["from"] == "rs_sft"
    # ... and what it loaded: a trained model records the checkpoint it was loaded from.
    assert loaded_from(rl["output"]) == cold["output"]
    assert loaded_from(rs_sft["output"]) == rl["output"]
    for s in after.values():
        assert s["output"].startswith(str(out / s["name"]))
        assert s["versions"]["torch"] and s["versions"]["transformers"] and s["versions"]["trl"]
        assert s["wall_s"] > 0 and s["started_at"] <= s["ended_at"]
        assert len(s["config_hash"]) == 16
    assert rl["metrics"]["metric_rows"] == 3 * 4  # 3 rollouts x 4 minibatches
    # Evaluation between stages: eval.json next to the stage, its numbers in the manifest and the table.
    for name in ("cold_start", LAST):
        ev = json.loads((out / name / "eval.json").read_text())
        assert ev["num_prompts"] == 8 and ev["model"] == after[name]["output"]
        assert after[name]["metrics"]["accuracy"] == ev["rewards/synthetic_accuracy/mean"]
        assert after[name]["eval_wiring"]["rewards.2.kwargs.model_path"]["value"] == rm["output"]
    assert after[LAST]["metrics"]["alignment reward"] == json.loads(
        (out / LAST / "eval.json").read_text())["rewards/reward_model/mean"]
    report = (out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in after)
    assert (out / "reward.png").exists() and (out / "sft_loss.png").exists()


def test_killed_pipeline_resumes_without_rerunning_finished_stages(killed_then_resumed):
    r = killed_then_resumed
    out, before, after = r["out"], r["before"], r["after"]
    assert before[LAST]["status"] == "running"  # SIGKILL left it mid-stage
    for name in EARLIER:
        assert before[name]["status"] == "done"
        for key in ("started_at", "ended_at", "wall_s", "config_hash", "output"):
            assert after[name][key] == before[name][key], (name, key)
        assert tree_mtimes(out / name) == r["mtimes"][name], f"{name}'s files were rewritten"
        assert f"stage {name}: done" in r["log"]
    assert r["log"].count("skipped") == len(EARLIER)
    last = after[LAST]
    assert last["resumed_from"] == "latest"
    # The resumed stage started from its checkpoint, not from rs_sft's output ...
    assert f"/{LAST}/checkpoints/rollout-" in loaded_from(last["output"])
    # ... and its metrics read as one unbroken run: every rollout once, in order.
    rows = [json.loads(line) for line in (out / LAST / "metrics.jsonl").read_text().splitlines()]
    rollouts = [row["rollout"] for row in rows]
    assert sorted(set(rollouts)) == list(range(1, ROLLOUTS + 1)) and rollouts == sorted(rollouts)
    assert len(rows) == ROLLOUTS * 4
    assert r["killed_at"] < ROLLOUTS


def test_pipeline_killed_in_stage_3_reruns_only_from_there(tmp_path):
    """The issue's case: interrupted in stage 3 (RS-SFT) while it trains, the rerun starts there; stages 1-2 are
    not rerun. The kill lands after rs_sft logged its first optimizer step and before it saved (it did work)."""
    out = tmp_path / "out"
    pipe = write_four_stage_pipeline(tmp_path / "pipe.yaml", out, alignment_rollouts=2)
    rs_sft_steps = ["stages.rs_sft.sft.max_steps=16", "stages.rs_sft.logging.log_every=1"]
    proc = gspo("pipeline", pipe, *rs_sft_steps, cwd=tmp_path)
    rs_metrics = out / "rs_sft" / "metrics.jsonl"
    deadline = time.time() + 300
    while True:  # SIGKILL as soon as rs_sft has logged a training step
        assert proc.poll() is None, f"the pipeline ended before rs_sft trained:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "rs_sft did not log a step within 300 s"
        if rs_metrics.exists() and rs_metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = [json.loads(line) for line in rs_metrics.read_text().splitlines()]
    assert 1 <= len(logged) < 16 and not (out / "rs_sft" / "final").exists()  # killed mid-training
    before = manifest(out)
    earlier = ("reward_model", "cold_start", "reasoning_rl", "rejection_sampling")
    mtimes = {s: tree_mtimes(out / s) for s in earlier}
    second = gspo("pipeline", pipe, *rs_sft_steps, cwd=tmp_path)
    log, _ = second.communicate(timeout=400)
    assert second.returncode == 0, log[-3000:]
    after = manifest(out)
    assert before["rs_sft"]["status"] == "running" and after["rs_sft"]["status"] == "done"
    assert (out / "rs_sft" / "final" / "config.json").exists()
    assert loaded_from(after["rs_sft"]["output"]) == after["reasoning_rl"]["output"]
    assert after[LAST]["status"] == "done"
    for name in earlier:
        assert before[name]["status"] == "done"
        assert after[name]["started_at"] == before[name]["started_at"], name
        assert tree_mtimes(out / name) == mtimes[name], f"{name}'s files were rewritten"
    assert after["rs_sft"]["started_at"] > before["rs_sft"]["started_at"]  # restarted, not skipped
    assert log.count("skipped") == len(earlier)


def test_changed_config_of_a_finished_stage_is_refused_then_rerun(killed_then_resumed, tmp_path):
    r = killed_then_resumed
    changed = gspo("pipeline", r["pipe"], "stages.reasoning_rl.optim.lr=1e-4", cwd=r["tmp"])
    log, _ = changed.communicate(timeout=120)
    assert changed.returncode == 1
    assert "reasoning_rl" in log and "optim.lr" in log and "--rerun" in log
    assert manifest(r["out"]) == r["after"]  # nothing ran
    dry = gspo("pipeline", r["pipe"], "--dry-run", "stages.alignment_rl.train.num_rollouts=2", cwd=r["tmp"])
    log, _ = dry.communicate(timeout=120)
    assert dry.returncode == 0 and "pipeline OK" in log
    assert manifest(r["out"]) == r["after"]


def test_rerun_runs_the_changed_stage_and_every_later_one(tmp_path):
    out = tmp_path / "out"
    stages = three_stages()[:2]
    pipe = write_pipeline(tmp_path / "p.yaml", stages, out)
    first = gspo("pipeline", pipe, "--no-report", cwd=tmp_path)
    assert first.wait(timeout=300) == 0, first.stdout.read()[-3000:]
    old = manifest(out)
    second = gspo("pipeline", pipe, "--rerun", "--no-report", "stages.cold_start.sft.max_steps=4", cwd=tmp_path)
    log, _ = second.communicate(timeout=300)
    assert second.returncode == 0, log[-3000:]
    new = manifest(out)
    assert new["cold_start"]["config"]["sft"]["max_steps"] == 4
    for name in ("cold_start", "reasoning_rl"):  # the RL stage's input changed, so it ran again too
        assert new[name]["started_at"] >= old[name]["ended_at"] and new[name]["status"] == "done"
    assert loaded_from(new["reasoning_rl"]["output"]) == new["cold_start"]["output"]


# --- schema, wiring and overrides (no model is loaded) ---------------------------------------------------------


def test_stage_targeted_overrides_reach_only_their_stage(tmp_path):
    pipe = write_pipeline(tmp_path / "p.yaml", three_stages(), tmp_path / "out")
    p = load_pipeline(pipe, ["stages.polish_rl.algorithm.clip_high=5e-4", "output_dir=" + str(tmp_path / "o2")])
    stages = {s.spec.name: s for s in resolve_stages(p)}
    assert stages["polish_rl"].config.algorithm.clip_high == 5e-4
    assert stages["reasoning_rl"].config.algorithm.clip_high == 4e-4  # the recipe's value
    assert stages["polish_rl"].config.output_dir == str(tmp_path / "o2" / "polish_rl")
    # A pipeline file's own override and the command line's: the command line comes last and wins.
    p = load_pipeline(pipe, ["stages.reasoning_rl.train.num_rollouts=7"])
    assert {s.spec.name: s for s in resolve_stages(p)}["reasoning_rl"].config.train.num_rollouts == 7


def test_unknown_stage_in_an_override_lists_the_stages(tmp_path):
    pipe = write_pipeline(tmp_path / "p.yaml", three_stages(), tmp_path / "out")
    with pytest.raises(ConfigError) as e:
        load_pipeline(pipe, ["stages.reasoning.algorithm.clip_high=5e-4"])
    msg = str(e.value)
    assert "cold_start, reasoning_rl, polish_rl" in msg and "did you mean 'reasoning_rl'" in msg
    with pytest.raises(ConfigError, match="output_dir="):
        split_overrides(["algorithm.clip_high=5e-4"], ["a"])
    from gspo.cli import main

    assert main(["pipeline", pipe, "--dry-run", "stages.nope.seed=1"]) == 2


def test_a_bad_key_in_any_stage_fails_validation_before_anything_runs(tmp_path):
    pipe = write_pipeline(tmp_path / "p.yaml", three_stages(), tmp_path / "out")
    with pytest.raises(ConfigError) as e:
        resolve_stages(load_pipeline(pipe, ["stages.polish_rl.algorithm.clip_hihg=1e-3"]))
    assert "stage 'polish_rl'" in str(e.value) and "clip_high" in str(e.value)
    assert e.value.key == "stages.polish_rl.algorithm.clip_hihg"
    assert not (tmp_path / "out").exists()


def _stage_config(tmp_path, name, data):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_default_wiring_by_stage_type_and_explicit_inputs(tmp_path):
    task = {"task": "add", "num_samples": 16}
    sft = _stage_config(tmp_path, "sft", {"stage": "sft", "model": {"name_or_path": "tiny:qwen3_moe"}, "data": task})
    rl = _stage_config(tmp_path, "rl", {"stage": "rl", "model": {"name_or_path": "x/y"}, "data": task,
                                        "rewards": ["synthetic_accuracy"]})
    rs = _stage_config(tmp_path, "rs", {"stage": "rejection_sampling", "model": {"name_or_path": "x/y"},
                                        "data": task, "rewards": ["synthetic_accuracy"]})
    rm = _stage_config(tmp_path, "rm", {"stage": "reward_model", "model": {"name_or_path": "tiny:qwen3_moe"},
                                        "data": task})
    align = _stage_config(tmp_path, "align", {
        "stage": "rl", "model": {"name_or_path": "x/y"}, "data": task,
        "rewards": ["synthetic_accuracy", {"fn": "reward_model", "kwargs": {"model_path": "unset"}}]})
    out = tmp_path / "out"
    stages = [{"name": "cold", "config": sft}, {"name": "rl1", "config": rl}, {"name": "rs", "config": rs},
              {"name": "rs_sft", "config": sft}, {"name": "rm", "config": rm}, {"name": "align", "config": align},
              {"name": "again", "config": rl, "input": {"from": "cold"}},
              {"name": "keep", "config": rl, "input": {"model": None}}]
    got = {s.spec.name: s for s in resolve_stages(load_pipeline(write_pipeline(tmp_path / "p.yaml", stages, out)))}
    final = {n: str(out / n / "final") for n in ("cold", "rl1", "rs_sft", "rm", "align")}
    assert got["cold"].wiring == {}  # the first stage keeps its own model
    assert got["rl1"].config.model.name_or_path == final["cold"]
    assert got["rs"].config.model.name_or_path == final["rl1"]
    assert got["rs_sft"].config.model.name_or_path == final["rl1"]  # rs produces data, not a policy
    assert got["rs_sft"].config.data.path == str(out / "rs" / "data.jsonl") and got["rs_sft"].config.data.task is None
    assert got["rm"].wiring == {}  # a reward model starts from its own config's model
    assert got["align"].config.model.name_or_path == final["rs_sft"]
    assert got["align"].config.rewards[1].kwargs["model_path"] == final["rm"]
    assert got["align"].wiring["rewards.1.kwargs.model_path"]["from"] == "rm"
    assert got["again"].config.model.name_or_path == final["cold"]
    assert got["keep"].config.model.name_or_path == "x/y" and got["keep"].wiring == {}
    assert set(got["align"].pending_inputs) == {"model.name_or_path", "rewards.1.kwargs.model_path"}
    # The stage's explicit override beats the wiring.
    stages[1]["overrides"] = ["model.name_or_path=some/other"]
    got = resolve_stages(load_pipeline(write_pipeline(tmp_path / "p.yaml", stages, out)))
    assert got[1].config.model.name_or_path == "some/other"
    stages[1]["input"] = {"from": "rs"}
    with pytest.raises(ConfigError, match="not an earlier stage; earlier stages: cold"):
        load_pipeline(write_pipeline(tmp_path / "p.yaml", stages, out))


def test_gspo_eval_prints_pass_at_k_and_writes_eval_json(killed_then_resumed, tmp_path, capsys):
    from gspo.cli import main

    after = killed_then_resumed["after"]
    out = tmp_path / "eval"
    rc = main(["eval", os.path.join(TINY, "eval.yaml"), f"model.name_or_path={after['rs_sft']['output']}",
               f"rewards.2.kwargs.model_path={after['reward_model']['output']}", f"output_dir={out}",
               "rollout.engine=hf_generate", "eval.num_prompts=4", "eval.num_samples=2", "eval.k=[1,2]"])
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("pass@1: ") and printed[1].startswith("pass@2: ")
    result = json.loads((out / "eval.json").read_text())
    assert float(printed[0].split()[1]) == pytest.approx(result["pass@1"], abs=1e-4)
    assert result["model"] == after["rs_sft"]["output"] and result["num_prompts"] == 4
