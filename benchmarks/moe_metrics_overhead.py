"""Overhead of the MoE routing recorder + expert-health metrics on a training step (fwd + bwd).

Runs, interleaved in one process on the same model and batch (so drift in clocks/thermals hits every variant):
  base      plain forward + backward;
  hooks     the same under RoutingRecorder, records never read (cost of the hooks alone);
  recorded  the same under RoutingRecorder (indices + entropy), then routing_metrics, tracker update and
            routing_drift against the previous step's records (what the trainer does per minibatch);
  aux       recorded + keep_logits and the load-balancing aux loss added to the loss (aux_loss_coef > 0);
  replay    recorded + RoutingReplay of the previous step's experts (R2).
Prints the median step time of each and its overhead over base in %.

    python benchmarks/moe_metrics_overhead.py                      # CPU, tiny qwen3_moe
    python benchmarks/moe_metrics_overhead.py --preset qwen3-30b-a3b-4l --device cuda --dtype bfloat16 \
        --experts grouped_mm --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from gspo.moe import (
    ExpertHealthTracker,
    RoutingRecorder,
    RoutingReplay,
    load_balancing_loss,
    routing_drift,
    routing_metrics,
)

# Qwen3-30B-A3B shapes cut to 4 layers (as in the project's GPU measurements).
_PRESETS = {
    "qwen3-30b-a3b-4l": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "max_position_embeddings": 4096, "pad_token_id": 0,
        "eos_token_id": 1, "bos_token_id": None,
    },
}


def build(args):
    if args.preset == "tiny":
        from gspo.models.loading import tiny_config

        cfg = tiny_config(args.family)
    else:
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(**_PRESETS[args.preset])
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation=args.experts)
    return model.to(args.device).train(), cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", *_PRESETS])
    p.add_argument("--family", default="qwen3_moe", help="tiny family (preset tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--experts", default="eager", help="experts_implementation")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    model, cfg = build(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    attn = torch.ones_like(ids)
    attn[: args.batch // 2, : args.seq // 8] = 0  # some left padding, as in rollout batches
    tracker = ExpertHealthTracker(window=8, collapse_threshold=1e9)
    prev = {"records": None}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def fwd_bwd(extra=None):
        out = model(input_ids=ids, attention_mask=attn)
        loss = out.logits.float().logsumexp(-1).mean()  # any scalar that touches every logit
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def base():
        fwd_bwd()

    def recorder_only():
        with RoutingRecorder(model):
            fwd_bwd()

    def recorded(keep_logits=False, replay=False):
        source = prev["records"]
        with RoutingRecorder(model, keep_logits=keep_logits) as rec:
            if replay and source is not None:
                with RoutingReplay(model, source):
                    out = model(input_ids=ids, attention_mask=attn)
            else:
                out = model(input_ids=ids, attention_mask=attn)
        records = rec.records()
        loss = out.logits.float().logsumexp(-1).mean()
        if keep_logits:
            loss = loss + 1e-3 * load_balancing_loss(records)
        loss.backward()
        model.zero_grad(set_to_none=True)
        metrics = routing_metrics(records)
        metrics.update(tracker.update(records))
        if source is not None:
            metrics.update(routing_drift(source, records))
        prev["records"] = records
        return metrics

    variants = {
        "base": base,
        "hooks": recorder_only,
        "recorded": lambda: recorded(),
        "aux": lambda: recorded(keep_logits=True),
        "replay": lambda: recorded(replay=True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.warmup + args.steps):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    last = recorded()
    # Breakdown of the bookkeeping after a recorded step (each part synchronized and timed alone).
    with RoutingRecorder(model) as rec:
        fwd_bwd()
    sync()
    parts: dict[str, list[float]] = {"records()": [], "routing_metrics": [], "tracker.update": [],
                                     "routing_drift": []}
    for _ in range(args.steps):
        for name, fn in (("records()", rec.records),
                         ("routing_metrics", lambda: routing_metrics(prev["records"])),
                         ("tracker.update", lambda: tracker.update(prev["records"])),
                         ("routing_drift", lambda: routing_drift(prev["records"], prev["records"]))):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            parts[name].append(time.perf_counter() - t0)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; preset {args.preset} ({args.family if args.preset == 'tiny' else 'qwen3_moe'}), "
          f"{args.dtype}, experts={args.experts}, batch {args.batch} x {args.seq} tokens, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.steps} rounds")
    t_base = statistics.median(times["base"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>9}: median {med * 1e3:9.2f} ms  (min {min(ts) * 1e3:9.2f})  overhead "
              f"{100 * (med - t_base) / t_base:+6.1f}%")
    print("bookkeeping (median ms):", {k: round(statistics.median(v) * 1e3, 3) for k, v in parts.items()})
    print("sample metrics:", {k: round(v, 4) for k, v in last.items() if "/layer" not in k})


if __name__ == "__main__":
    main()
