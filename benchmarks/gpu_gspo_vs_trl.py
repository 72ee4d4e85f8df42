"""gspo's trainer next to TRL's GSPO on one GPU, same model, data, reward and schedule, in one run.

The setting is TRL's GSPO anchor (shared/bench/trl_gspo_anchor.py): a Qwen3-30B-A3B-shaped MoE cut to 4 layers
(hidden 2048, 128 experts top-8, vocab 151936), random bf16 weights, 64 completions x 256 tokens per rollout
(8 prompts x G=8), 4 optimizer steps per rollout, clip 3e-4/4e-4, lr 1e-6, HF generate rollouts (vLLM is not
installed on the GPU machine). Prints seconds per rollout cycle, the hop split and peak memory for gspo;
run the anchor in the same call for TRL's figure:

    python benchmarks/gpu_gspo_vs_trl.py --rollouts 4 && python trl_gspo_anchor.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import textwrap
import time

import torch

VOCAB = 151936


def build_model_dir(root: str, layers: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1", eos_token="w2")
    tokenizer.chat_template = "{{ messages[0]['content'] }}"  # raw prompts, as the anchor feeds them
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=128, num_experts_per_tok=8, max_position_embeddings=4096, pad_token_id=1,
                         eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    path = os.path.join(root, "model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from gspo.config import load_config
    from gspo.training.trainer import GSPOTrainer

    root = tempfile.mkdtemp(prefix="gspo-gpu-bench-")
    model_path = build_model_dir(root, args.layers)
    random.seed(0)
    with open(os.path.join(root, "data.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": " ".join(f"w{random.randint(3, 5000)}" for _ in range(64))}) + "\n" for _ in range(512))
    with open(os.path.join(root, "bench_rewards.py"), "w") as f:
        f.write(textwrap.dedent("""
            import random
            def reward_len(prompts, completions, completion_ids, **kw):
                return [float(len(c)) / 1000.0 + random.random() for c in completions]
        """))
    cfg = load_config(None, [
        "stage=rl", f"output_dir={root}/run", f"model.name_or_path={model_path}", "model.dtype=bfloat16",
        f"data.path={root}/data.jsonl", "rollout.engine=hf_generate", "rollout.group_size=8",
        "rollout.prompts_per_step=8", "rollout.max_new_tokens=256", "algorithm.name=gspo",
        "algorithm.num_minibatches=4", "optim.lr=1e-6", f"train.num_rollouts={args.rollouts}",
        f"rewards=[{root}/bench_rewards.py:reward_len]", "logging.progress=false", *args.overrides])
    t0 = time.perf_counter()
    trainer = GSPOTrainer(cfg)
    print(f"setup {time.perf_counter() - t0:.1f} s; experts backend "
          f"{trainer.model.config.gspo_experts_implementation}")
    torch.cuda.reset_peak_memory_stats()
    rows = []
    for _ in range(args.rollouts):
        torch.cuda.synchronize()
        rows.append(trainer.step()[-1])
    steady = rows[1:] if len(rows) > 1 else rows
    cycle = statistics.median(r["timing/step"] for r in steady)
    hops = {k[7:]: round(statistics.median(r[k] for r in steady), 3) for k in steady[0] if k.startswith("timing/")}
    print(f"gspo GSPO: {cycle:.2f} s per rollout cycle (64 completions x <=256 tokens, 4 optimizer steps); "
          f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print("hops (median s):", hops)
    last = rows[-1]
    print({k: round(v, 5) for k, v in last.items() if k in (
        "clip_frac/low", "clip_frac/high", "completions/mean_length", "moe/routing_drift", "moe/load_max_over_mean",
        "logp_gap/mean", "logp_gap/max")})


if __name__ == "__main__":
    main()
