"""The rl stage at real scale: a random bf16 model of Qwen3-30B-A3B's exact shape (all 48 layers, or a layer cut),
built on the machine (nothing is downloaded), a recipe's rl stage with local data and a local reward swapped in by
overrides, on 1 or N GPUs of one host.

Per rollout it prints one JSON line (`ROLLOUT {...}`): the hop seconds, completion tokens, completion tokens/s per
GPU (the rollout hop), loss / grad norm / reward, and the peak memory of every GPU (torch's peak allocation and
the card's used memory, which includes vLLM's pool). The last line (`SUMMARY {...}`) has the medians over the
rollouts after the first.

    python benchmarks/multi_gpu.py --recipe recipes/qwen3_moe/lora/reasoning_rl.yaml --layers 24 --rollouts 5 \
        rollout.engine=hf_generate
    python benchmarks/multi_gpu.py --gpus 2 --recipe recipes/qwen3_moe/full/reasoning_rl.yaml --layers 12

`--check-finite` adds a scan of every gradient and parameter around each optimizer step and of the logits of
every generation step, and names the first non-finite tensor (the diagnosis of a run that dies in sampling).
With --gpus N > 1 the script starts itself under torchrun, one process per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark's helpers

VOCAB = 151936
# Qwen3-30B-A3B's config.json (hidden, experts, heads); only num_hidden_layers is cut.
SHAPE = {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
         "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
         "max_position_embeddings": 40960, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
         "router_aux_loss_coef": 0.001, "norm_topk_prob": True, "tie_word_embeddings": False}


def build_model_dir(root: str, layers: int) -> str:
    """A Qwen3-30B-A3B-shaped model cut to `layers`, random bf16 weights initialised on the GPU (transformers'
    own init, std 0.02), saved with a word-level tokenizer whose chat template passes the prompt through."""
    path = os.path.join(root, f"qwen3moe-{layers}l")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from gpu_gspo_vs_trl import word_tokenizer
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = word_tokenizer(VOCAB)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, num_hidden_layers=layers, pad_token_id=1, eos_token_id=2,
                         bos_token_id=None, **SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3MoeForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    t = time.perf_counter()
    model.save_pretrained(path, max_shard_size="5GB")
    tokenizer.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {path}: {n / 1e9:.2f}B parameters, saved in {time.perf_counter() - t:.0f} s", flush=True)
    del model
    torch.cuda.empty_cache()
    return path


def write_data(root: str) -> tuple[str, str]:
    """512 prompts of 64 random words, and a reward that prefers longer completions plus noise (every group has
    spread, so every rollout updates)."""
    random.seed(0)
    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": " ".join(f"w{random.randint(3, 5000)}" for _ in range(64))}) + "\n" for _ in range(512))
    reward = os.path.join(root, "scale_reward.py")
    with open(reward, "w") as f:
        f.write("import random\n\n\ndef reward_len(prompts, completions, completion_ids, **kw):\n"
                "    return [len(c) / 1000.0 + random.random() for c in completions]\n")
    return data, reward


def first_nonfinite(named: list[tuple[str, torch.Tensor | None]]) -> str | None:
    """Name and max |value| of the first tensor with a non-finite entry (one host sync for all of them)."""
    named = [(n, t) for n, t in named if t is not None]
    if not named:
        return None
    bad = torch.stack([(~torch.isfinite(t.detach())).any() for _, t in named]).cpu()
    for (n, t), b in zip(named, bad.tolist()):
        if b:
            return f"{n} {tuple(t.shape)} ({int((~torch.isfinite(t)).sum())} non-finite)"
    return None


def add_finite_checks(trainer, log: list) -> None:
    """Diagnosis only: scan gradients before each optimizer step and parameters after it; scan the logits of
    every forward of the policy (generation steps included) and stop at the first non-finite one."""
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, step = trainer.optimizer, trainer.optimizer.step

    def checked_step(*a, **kw):
        grads = first_nonfinite([(n, p.grad) for n, p in params])
        gmax = max(float(p.grad.detach().abs().max()) for _, p in params if p.grad is not None)
        out = step(*a, **kw)
        bad = first_nonfinite(params)
        log.append({"rollout": trainer.rollout_idx, "grad_nonfinite": grads, "grad_absmax": gmax,
                    "param_nonfinite": bad})
        if grads or bad:
            print("NONFINITE " + json.dumps(log[-1]), flush=True)
        return out

    opt.step = checked_step

    import dataclasses

    loss_fn = trainer.spec.fn

    def checked_loss(logp, old_logp, adv, mask, **kw):
        out = loss_fn(logp, old_logp, adv, mask, **kw)
        m = mask.bool()
        found = {k: int((~torch.isfinite(v[m] if v.dim() == 2 else v)).sum())
                 for k, v in (("logp", logp.detach()), ("old_logp", old_logp), ("adv", adv))}
        if any(found.values()) or not bool(torch.isfinite(out.loss)):
            print("NONFINITE_LOSS_INPUTS " + json.dumps({"rollout": trainer.rollout_idx, **found,
                                                         "loss": float(out.loss.detach())}), flush=True)
        return out

    trainer.spec = dataclasses.replace(trainer.spec, fn=checked_loss)
    backward = trainer.accelerator.backward

    def checked_backward(loss, **kw):
        if not bool(torch.isfinite(loss)):
            print(f"NONFINITE_BACKWARD_LOSS rollout {trainer.rollout_idx}: {float(loss.detach())}", flush=True)
        return backward(loss, **kw)

    trainer.accelerator.backward = checked_backward
    counter = {"calls": 0}

    def logits_hook(module, inputs, output):
        counter["calls"] += 1
        logits = output.logits if hasattr(output, "logits") else output
        if not bool(torch.isfinite(logits).all()):
            if bool((~torch.isfinite(logits)).all()):
                raise RuntimeError(f"every logit is non-finite (forward call {counter['calls']})")
            rows = torch.nonzero(~torch.isfinite(logits).all(dim=-1).reshape(logits.shape[0], -1).all(dim=-1))
            msg = {"rollout": trainer.rollout_idx, "forward_call": counter["calls"], "rows": rows.flatten().tolist()[:8],
                   "logits_absmax_finite": float(logits[torch.isfinite(logits)].abs().max())}
            print("NONFINITE_LOGITS " + json.dumps(msg), flush=True)
            raise RuntimeError(f"non-finite logits: {msg}")

    # peft's generate calls the base model directly: hook the innermost causal LM.
    (model.get_base_model() if hasattr(model, "get_base_model") else model).register_forward_hook(logits_hook)


def child(args: argparse.Namespace) -> None:
    from gpu_gspo_vs_trl import PeakMemory

    from gspo.config import load_config
    from gspo.training.trainer import GSPOTrainer

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    data, reward = write_data(args.root) if rank == 0 or not os.path.exists(os.path.join(args.root, "data.jsonl")) \
        else (os.path.join(args.root, "data.jsonl"), os.path.join(args.root, "scale_reward.py"))
    model_path = os.path.join(args.root, f"qwen3moe-{args.layers}l")
    cfg = load_config(args.recipe, [
        f"output_dir={args.root}/run-{args.layers}l-{world}gpu", f"model.name_or_path={model_path}",
        f"data.path={data}", "data.split=train", "data.prompt_column=prompt", "data.chat_template=never",
        f"rollout.group_size={args.group}", f"rollout.prompts_per_step={args.prompts}",
        f"rollout.max_new_tokens={args.new_tokens}", f"train.num_rollouts={args.rollouts}", "train.save_every=0",
        f"rewards=[{reward}:reward_len]", "logging.progress=false", "logging.trackers=[]", *args.overrides])
    finite_log: list = []
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        trainer = GSPOTrainer(cfg)
        setup = time.perf_counter() - t0
        if args.check_finite:
            add_finite_checks(trainer, finite_log)
        rows = []
        for _ in range(args.rollouts):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            row = trainer.step()[-1]
            n_tokens = row["completions/mean_length"] * args.prompts * args.group
            rec = {"rollout": row["rollout"], "hops": {k[7:]: round(v, 3) for k, v in row.items()
                                                      if k.startswith("timing/")},
                   "completion_tokens": int(n_tokens),
                   "tokens_per_s_per_gpu": round(n_tokens / row["timing/rollout"] / world, 1),
                   "loss": row.get("loss"), "grad_norm": row.get("grad_norm"), "reward": row.get("reward"),
                   "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
                   if torch.cuda.is_available() else 0.0,
                   "peak_used_gib": round(mem.peak / 2**30, 1)}
            rows.append(rec)
            if rank == 0:
                print("ROLLOUT " + json.dumps(rec), flush=True)
    steady = rows[1:] or rows
    peaks = [{"gpu": rank, "peak_alloc_gib": rows[-1]["peak_alloc_gib"], "peak_used_gib": rows[-1]["peak_used_gib"]}]
    if world > 1:  # every GPU's peak (the trainer has set up the process group)
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, peaks[0])
        peaks = gathered
    summary = {"layers": args.layers, "gpus": world, "setup_s": round(setup, 1),
               "step_s": statistics.median(r["hops"]["step"] for r in steady),
               "hops": {k: statistics.median(r["hops"][k] for r in steady) for k in steady[0]["hops"]},
               "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s_per_gpu"] for r in steady),
               "peak_per_gpu": peaks,
               "nonfinite": [e for e in finite_log if e["grad_nonfinite"] or e["param_nonfinite"]]}
    if rank == 0:
        print("SUMMARY " + json.dumps(summary), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/qwen3_moe/lora/reasoning_rl.yaml")
    ap.add_argument("--layers", type=int, default=48, help="decoder layers (Qwen3-30B-A3B has 48)")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--rollouts", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--root", default="/tmp/gspo-scale")
    ap.add_argument("--check-finite", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on CPU: a check of the script itself")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="gspo config overrides (key=value)")
    args = ap.parse_args()
    if args.smoke:
        global VOCAB
        VOCAB = 6000
        SHAPE.update(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
        args.root += "-smoke"
    if args.child:
        return child(args)
    os.makedirs(args.root, exist_ok=True)
    build_model_dir(args.root, args.layers)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *sys.argv[1:]]
    if args.gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
               *cmd[1:]]
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
