"""Rank 0's host memory while writing a consolidated HF folder from an FSDP2-sharded policy (2 gloo processes, CPU).

`save_consolidated` (gspo/training/dist_checkpoint.py) gathers one decoder layer at a time and streams it into
safetensors files of at most --shard-mb; the naive way gathers the full state dict on rank 0 (DCP's
`get_model_state_dict(full_state_dict=True, cpu_offload=True)`) and calls save_pretrained. Each way runs in
its own pair of processes (memory freed by one save stays in the allocator and would hide the next one's).
Rank 0's resident memory is sampled every 5 ms; the table gives its peak above the level before the save, next
to the model's size, and the seconds the save took.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/consolidate_memory.py --layers 8 --hidden 512 --shard-mb 32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import torch
import torch.multiprocessing as mp


def _rss() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _Peak:
    def __init__(self) -> None:
        self.base, self.peak, self.stop = _rss(), 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def done(self) -> int:
        self.stop = True
        self.thread.join()
        return max(self.peak, _rss()) - self.base


MODES = ("save_consolidated", "full_state_dict + save_pretrained")


def _worker(rank, world, args, tmp, path, mode):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    from gspo.models.loading import build_tokenizer
    from gspo.training.dist_checkpoint import save_consolidated
    from gspo.training.fsdp import shard_policy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        model = shard_policy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        size = sum(p.numel() * p.element_size() for p in model.parameters())  # global (DTensor numel)
        tok = build_tokenizer()
        for name in (mode,):
            dist.barrier()
            peak, start = _Peak(), time.perf_counter()
            out = os.path.join(tmp, name.split()[0])
            if name == "save_consolidated":
                save_consolidated(model, tok, out, max_shard_bytes=args.shard_mb * 2**20)
            else:
                full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if rank == 0:
                    model.save_pretrained(out, state_dict=full)
                del full
            dist.barrier()
            mem, sec = peak.done(), time.perf_counter() - start
        if rank == 0:
            with open(os.path.join(tmp, "rows.txt"), "a", encoding="utf-8") as f:
                f.write(f"| {mode} | {size / 2**20:.0f} | {mem / 2**20:.0f} | {sec:.1f} |\n")
    finally:
        dist.destroy_process_group()


def main() -> None:
    from gspo.models.loading import build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--shard-mb", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model("qwen3_moe", os.path.join(tmp, "model"), num_hidden_layers=args.layers,
                                hidden_size=args.hidden, num_attention_heads=8, head_dim=64,
                                num_experts=args.experts, moe_intermediate_size=args.hidden // 2,
                                intermediate_size=args.hidden)
        for mode in MODES:
            if os.path.exists(os.path.join(tmp, "rendezvous")):
                os.remove(os.path.join(tmp, "rendezvous"))
            mp.start_processes(_worker, args=(2, args, tmp, path, mode), nprocs=2, join=True, start_method="spawn")
        print(f"{args.layers} layers, hidden {args.hidden}, {args.experts} experts, fp32, 2 processes, "
              f"shard limit {args.shard_mb} MiB")
        print("| save | model (MiB) | rank 0 peak RSS above baseline (MiB) | seconds |\n|---|---|---|---|")
        with open(os.path.join(tmp, "rows.txt"), encoding="utf-8") as f:
            print(f.read(), end="")


if __name__ == "__main__":
    main()
