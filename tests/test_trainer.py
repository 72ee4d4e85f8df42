"""The GSPO trainer end to end on CPU with a tiny MoE: it learns with vLLM rollouts, it clips only when updates
go off-policy, and a run killed with SIGKILL resumes to exactly the metrics of an uninterrupted run."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY, tiny_config

RL = os.path.join(TINY, "reasoning_rl.yaml")


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _gspo(*args, **popen):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "gspo", *args], cwd=REPO, env=env, **popen)


def _train(*args, timeout=900):
    proc = _gspo("train", RL, "logging.progress=false", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _per_rollout(rows, key):
    return [r[key] for r in rows if r["minibatch"] == 0 and r["epoch"] == 0]


# 125 s on an idle 2-core machine; the run inside has its own 900 s limit.
@pytest.mark.timeout(1500)
def test_tiny_recipe_reward_rises_with_vllm(warm_model, tmp_path):
    """The recipe as shipped (vLLM engine, GSPO, 4 minibatches), from the cold-start model.

    Margin: the last fifth of rollouts must beat the first fifth by more than 0.08 (absolute accuracy) AND by
    more than 3 standard errors of the difference of the two means (rollouts treated as independent samples;
    the per-rollout reward varies with the drawn prompts, sd ~0.08 here), i.e. a rise that noise around a
    flat curve reaches with probability < 0.2%.
    """
    out = tmp_path / "rl"
    _train(f"output_dir={out}", f"model.name_or_path={warm_model}")
    rows = _metrics(out)
    rewards = _per_rollout(rows, "reward")
    assert len(rewards) == 100
    fifth = len(rewards) // 5
    first, last = rewards[:fifth], rewards[-fifth:]

    def mean_var(xs):
        m = sum(xs) / len(xs)
        return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    (m1, v1), (m2, v2) = mean_var(first), mean_var(last)
    se = math.sqrt(v1 / fifth + v2 / fifth)
    assert m2 - m1 > max(0.08, 3 * se), (m1, m2, se)

    # The run used the engine it was asked for and the contract's metrics are all there.
    last_row = rows[-1]
    for key in ("step", "loss", "reward", "reward_std", "rewards/synthetic_accuracy/mean", "clip_frac/low",
                "clip_frac/high", "clip_frac_seq/low", "clip_frac_seq/high", "ratio/mean", "ratio/min",
                "ratio/max", "completions/mean_length", "completions/truncated_frac", "frac_reward_zero_std",
                "updates_per_rollout", "logp_gap/mean", "logp_gap/max", "timing/rollout", "timing/rewards",
                "timing/advantages", "timing/old_logprobs", "timing/update", "timing/weight_sync"):
        assert key in last_row, key
    assert last_row["step"] == 400 and last_row["updates_per_rollout"] == 4
    # vLLM (fp32) samples from the same distribution the trainer computes: the weight sync worked at every
    # check, and the engine returned its logprobs exactly on the rollouts rollout.logp_gap_every=10 names.
    checked = [r["rollout"] for r in rows if r["minibatch"] == 0 and "logp_gap/max" in r]
    assert checked == [1, 2, 3, *range(10, 101, 10)], checked
    assert max(r["logp_gap/max"] for r in rows if "logp_gap/max" in r) < 1e-3
    assert os.path.isfile(out / "final" / "config.json")
    assert os.path.isfile(out / "samples.jsonl")


def test_which_rollouts_ask_the_engine_for_logprobs(tmp_path):
    """logp_gap/* on rollouts 1-3 and every k-th; every rollout when the update reads the engine's logprobs."""
    from gspo.training.trainer import wants_engine_logprobs

    def asked(*args):
        cfg = tiny_config("reasoning_rl.yaml", tmp_path, *args)
        return [k for k in range(1, 26) if wants_engine_logprobs(cfg, k)]

    assert asked() == [1, 2, 3, 10, 20]  # the default, rollout.logp_gap_every=10
    assert asked("rollout.logp_gap_every=4") == [1, 2, 3, 4, 8, 12, 16, 20, 24]
    assert asked("rollout.logp_gap_every=1") == list(range(1, 26))
    assert asked("rollout.logp_gap_every=0") == []
    for needs in ("rollout.old_logp_source=engine", "algorithm.tis_cap=2.0", "algorithm.tis_mask_bound=0.5"):
        assert asked("rollout.logp_gap_every=0", needs) == list(range(1, 26)), needs


def _short_run(out, warm_model, *args):
    from gspo.training.trainer import GSPOTrainer

    cfg = tiny_config("reasoning_rl.yaml", out, f"model.name_or_path={warm_model}", "rollout.engine=hf_generate",
                      "train.num_rollouts=3", "rollout.prompts_per_step=8", *args)
    trainer = GSPOTrainer(cfg)
    return [row for _ in range(3) for row in trainer.step()]


def test_clipping_needs_off_policy_updates(warm_model, tmp_path):
    """One minibatch per rollout: the ratio is exactly 1 and nothing is clipped (GSPO = REINFORCE with a group
    baseline). Four minibatches: later updates are off-policy and GSPO clips some sequences."""
    on = _short_run(tmp_path / "on", warm_model, "algorithm.num_minibatches=1")
    assert len(on) == 3
    for r in on:
        assert r["clip_frac/low"] == r["clip_frac/high"] == r["clip_frac_seq/high"] == 0.0
        # 1 up to float rounding: the update pass batches the rows in another order than the π_old pass
        assert abs(r["ratio/min"] - 1) < 1e-6 and abs(r["ratio/max"] - 1) < 1e-6

    off = _short_run(tmp_path / "off", warm_model, "algorithm.num_minibatches=4")
    assert len(off) == 12
    first = [r for r in off if r["minibatch"] == 0]
    later = [r for r in off if r["minibatch"] > 0]
    assert all(r["clip_frac/low"] + r["clip_frac/high"] == 0.0 for r in first)  # π_θ = π_old before update 1
    assert sum(r["clip_frac/low"] + r["clip_frac/high"] for r in later) > 0
    assert max(r["ratio/max"] for r in later) > 1.0 > min(r["ratio/min"] for r in later)


# 82 s idle: two training runs (each with its own 900 s limit) and a killed one.
@pytest.mark.timeout(1800)
def test_sigkill_and_resume_reproduces_the_uninterrupted_run(warm_model, tmp_path):
    args = [f"model.name_or_path={warm_model}", "train.num_rollouts=8", "train.save_every=1",
            "rollout.prompts_per_step=4", "logging.sample_every=2"]
    full = tmp_path / "full"
    _train(f"output_dir={full}", *args)

    crashed = tmp_path / "crashed"
    proc = _gspo("train", RL, "logging.progress=false", f"output_dir={crashed}", *args,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = crashed / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text().strip() >= "rollout-000003"):
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "final").exists()  # it really died mid-run
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert killed_at < 8

    _train(f"output_dir={crashed}", *args, "resume_from=latest")
    a, b = _metrics(full), _metrics(crashed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 33))
    for ra, rb in zip(a, b):
        if ra["rollout"] <= killed_at:
            continue
        for key, va in ra.items():
            if key.startswith("timing/") or key in ("sync/seconds", "sync/gbps"):  # wall-clock measurements
                continue
            vb = rb[key]
            assert (va == vb) or (isinstance(va, float) and math.isclose(va, vb, rel_tol=1e-6, abs_tol=1e-9)), \
                (ra["step"], key, va, vb)


def test_engine_logprobs_as_old_logp_skip_the_trainer_pass(warm_model, tmp_path):
    """rollout.old_logp_source=engine: π_old is the sampler's logp and, with no MoE need for π_old's routing,
    the trainer's π_old forward does not run (so no engine-vs-trainer gap can be logged)."""
    rows = _short_run(tmp_path, warm_model, "rollout.old_logp_source=engine", "moe.metrics=false")
    assert len(rows) == 12
    assert all("logp_gap/mean" not in r for r in rows)
    first = [r for r in rows if r["minibatch"] == 0]
    # π_θ = π_old up to the engine/trainer numerical gap (~1e-6) before the first update: no clipping either way
    for r in first:
        assert abs(r["ratio/max"] - 1) < 1e-4 and abs(r["ratio/min"] - 1) < 1e-4, r
        assert r["clip_frac/low"] == r["clip_frac/high"] == r["clip_frac_seq/low"] == r["clip_frac_seq/high"] == 0


def test_kl_term_with_a_frozen_reference_model(warm_model, tmp_path):
    rows = _short_run(tmp_path, warm_model, "algorithm.beta=0.05")
    assert rows[0]["kl"] < 1e-9 < max(r["kl"] for r in rows)  # π_θ = reference until the first update


def test_periodic_evaluation_logs_eval_metrics_equal_to_gspo_eval(warm_model, tmp_path):
    """train.eval_every=2: rollouts 2 and 4 carry eval/* (pass@k, mean rewards) from the trainer's engine, and
    they are the numbers `gspo eval` (run_eval) gives for the checkpoint saved at that rollout; the report
    plots them."""
    from gspo.config import load_config
    from gspo.pipeline.report import make_plots
    from gspo.training.evaluation import run_eval
    from gspo.training.trainer import GSPOTrainer

    out = tmp_path / "rl"
    ev = ["eval.num_prompts=4", "eval.num_samples=2", "eval.k=[1,2]", "eval.pass_reward=synthetic_accuracy"]
    cfg = tiny_config("reasoning_rl.yaml", out, f"model.name_or_path={warm_model}", "rollout.engine=hf_generate",
                      "rollout.prompts_per_step=4", "train.num_rollouts=4", "train.save_every=2",
                      "train.eval_every=2", *ev)
    GSPOTrainer(cfg).train()
    rows = _metrics(out)
    with_eval = sorted({r["rollout"] for r in rows if "eval/pass@1" in r})
    assert with_eval == [2, 4]
    last = [r for r in rows if r["rollout"] == 4 and "eval/pass@1" in r][-1]
    assert {"eval/pass@2", "eval/reward/mean", "eval/rewards/synthetic_accuracy/mean",
            "eval/completions/mean_length", "timing/eval"} <= set(last)
    # The same evaluation from the saved checkpoint, as `gspo eval` runs it.
    ev_cfg = load_config(os.path.join(TINY, "reasoning_rl.yaml"),
                         [f"output_dir={tmp_path / 'ev'}", "rollout.engine=hf_generate", "rollout.prompts_per_step=4",
                          *ev])
    ref = run_eval(ev_cfg, model_path=str(out / "checkpoints" / "rollout-000004" / "model"))
    for key in ("pass@1", "pass@2", "reward/mean"):
        assert math.isclose(last[f"eval/{key}"], ref[key], abs_tol=1e-6), (key, last[f"eval/{key}"], ref[key])
    assert "eval.png" in make_plots(str(tmp_path), {"stages": [{"name": "rl", "type": "rl"}]})


def test_eos_token_is_in_the_loss(warm_model, tmp_path):
    """A completion that stopped on EOS is trained on its EOS token too (that is how the policy learns when to
    stop): the loss sees mask 1 and the policy's log-probability of EOS at that position, for every such row."""
    from gspo.training.trainer import GSPOTrainer

    cfg = tiny_config("reasoning_rl.yaml", tmp_path, f"model.name_or_path={warm_model}",
                      "rollout.engine=hf_generate", "rollout.prompts_per_step=4", "algorithm.num_minibatches=1")
    trainer = GSPOTrainer(cfg)
    seen = []
    loss_fn = trainer.spec.fn

    def observed(logp, old_logp, adv, mask, **kw):
        seen.append((logp.detach().cpu(), old_logp.detach().cpu(), mask.detach().cpu()))
        return loss_fn(logp, old_logp, adv, mask, **kw)

    trainer.spec = dataclasses.replace(trainer.spec, fn=observed)
    batches, minibatch_rows = [], []
    generate, logp_pass = trainer.engine.generate, trainer._logp
    trainer.engine.generate = lambda *a, **k: batches.append(generate(*a, **k)) or batches[-1]

    def logp_observed(batch, rows=None, **kw):
        if rows is not None:
            minibatch_rows.append(rows.tolist())
        return logp_pass(batch, rows, **kw)

    trainer._logp = logp_observed
    trainer.step()
    (batch,), (rows,), ((logp, old_logp, mask),) = batches, minibatch_rows, seen
    eos = trainer.tokenizer.eos_token_id
    stopped = [j for j, i in enumerate(rows) if batch.finish_reasons[i] == "stop"]  # loss row j = batch row i
    assert len(stopped) >= batch.num_completions // 2  # the warm model ends most answers itself
    for j in stopped:
        i = rows[j]
        last = batch.completion_ids[i].tolist().index(eos)  # where this completion stopped
        assert float(mask[j].sum()) == last + 1, f"row {i}: the loss mask is not the completion (EOS included)"
        assert float(mask[j, last]) == 1.0, f"row {i}: EOS left out of the loss mask"
        assert float(logp[j, last]) < 0.0 and float(old_logp[j, last]) < 0.0  # its log-probability is in the loss


def test_engine_length_covers_eval_prompts_rendered_with_the_eval_configs_template(warm_model, tmp_path):
    """train.eval_config may render prompts differently (its own data.chat_template): the engine's
    max_model_len is measured on the eval prompts as the evaluation renders them, or vLLM would reject them."""
    import yaml

    from gspo.data import prompt_token_ids
    from gspo.training.trainer import GSPOTrainer

    with open(os.path.join(TINY, "eval.yaml"), encoding="utf-8") as f:
        ev = yaml.safe_load(f)
    ev.setdefault("data", {})["chat_template"] = "always"
    ev["model"] = {"name_or_path": str(warm_model)}
    ev_path = tmp_path / "eval.yaml"
    ev_path.write_text(yaml.safe_dump(ev))
    cfg = tiny_config("reasoning_rl.yaml", tmp_path / "rl", f"model.name_or_path={warm_model}",
                      "rollout.engine=hf_generate", "data.chat_template=never", "train.eval_every=1",
                      f"train.eval_config={ev_path}")
    trainer = GSPOTrainer(cfg)
    longest = max(len(prompt_token_ids(trainer.tokenizer, r["prompt"], "always")) for r in trainer.eval_rows)
    assert trainer._default_max_len() >= longest + trainer.eval_cfg.rollout.max_new_tokens
