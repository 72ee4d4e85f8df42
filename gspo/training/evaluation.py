"""Evaluation: pass@1 / pass@k over n samples per prompt, and the sample-and-score loop it shares with the
`rejection_sampling` stage.

`run_eval(cfg)` samples `eval.num_samples` completions per prompt with the configured rollout engine, scores
them with `rewards`, and writes `pass@k` (Chen et al. 2021, Eq. 1), the mean of every reward and the lengths to
`<output_dir>/eval.json` (docs/stages.md, "Evaluation").
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gspo.data import build_dataset, describe_prompt_format, prompt_token_ids

if TYPE_CHECKING:
    from gspo.training.distributed import Dist

logger = logging.getLogger("gspo.eval")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, Eq. 1): 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the large binomials.

    >>> pass_at_k(4, 1, 1)
    0.25
    >>> pass_at_k(4, 0, 2), pass_at_k(4, 3, 2)
    (0.0, 1.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k samples contains a passing one
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# -- Sample and score (shared with the rejection_sampling stage) ---------------------------------------------


@dataclass
class Scored:
    """n completions for each of the B rows, prompt-major (completions of row b: b*n .. b*n + n - 1).

    rewards: [B*n] weighted sums (NaN where every function abstained); per_function: name -> [B*n] values;
    num_tokens: completion length in tokens (EOS not counted); finish_reasons: "stop" | "length".
    """

    rows: list[dict[str, Any]]
    n: int
    completions: list[str]
    finish_reasons: list[str]
    num_tokens: list[int]
    rewards: list[float]
    per_function: dict[str, list[float]]
    metrics: dict[str, float]


def open_engine(cfg: Any, model_path: str, tokenizer: Any, longest_prompt: int) -> Any:
    """The rollout engine of `cfg.rollout`, loading its own copy of `model_path` (no trainer model here)."""
    from gspo.rollout import EngineInputs, build_engine

    r = cfg.rollout
    return build_engine(r, EngineInputs(model_path, tokenizer, dtype=cfg.rollout_dtype, seed=cfg.seed,
                                        max_model_len=r.max_model_len or longest_prompt + r.max_new_tokens + 8))


@contextmanager
def rank_engine(cfg: Any, model_path: str, tokenizer: Any, rows: list[dict[str, Any]], d: Dist) -> Iterator[Any]:
    """The rollout engine of this rank, open for the whole block and closed at its end. Every rank opens one,
    also a rank whose share of `rows` is empty: a vLLM engine's start creates process groups, a collective of
    the launch's processes. A sharded run keeps it open until its collectives are done (the gather, the rank-0
    write and the exchange that ends it): closing a vLLM engine tears down the default process group. Its
    max_model_len comes from the longest of all `rows`, the same on every rank."""
    from gspo.training.distributed import fail_together

    engine = None
    try:
        with fail_together(d, "opening the rollout engine"):
            mode = cfg.data.chat_template
            longest = max(len(prompt_token_ids(tokenizer, row["prompt"], mode)) for row in rows)
            engine = open_engine(cfg, model_path, tokenizer, longest)
        yield engine
    finally:
        if engine is not None:
            engine.close()


def load_model_ref(cfg: Any, model_path: str | None = None) -> tuple[str, Any]:
    """(checkpoint directory, tokenizer) of `model_path` or cfg.model (a `tiny:` model is built first)."""
    from transformers import AutoTokenizer

    from gspo.models.loading import resolve_model_path

    m = cfg.model
    path = model_path or resolve_model_path(m.name_or_path, cfg.output_dir, seed=cfg.seed, dtype=m.dtype,
                                            tiny=m.tiny)
    tokenizer = AutoTokenizer.from_pretrained(m.tokenizer or path, trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return path, tokenizer


def shares(total: int, step: int, d: Dist) -> list[tuple[int, int, int]]:
    """This rank's part of sampling `total` prompts in engine calls of `step`: (call index b, lo, hi) with
    [lo, hi) this rank's prompts of call b (indices into the whole list). Every call is split over the ranks
    into contiguous runs of whole prompts (the first `size % world` ranks take one more; empty runs left
    out), so with `first_prompt` = lo - the call's start each prompt gets the seeds of the unsplit call."""
    parts = []
    for b, start in enumerate(range(0, total, step)):
        size = min(step, total - start)
        per, extra = divmod(size, d.world)
        lo = start + d.rank * per + min(d.rank, extra)
        hi = lo + per + (d.rank < extra)
        if hi > lo:
            parts.append((b, lo, hi))
    return parts


def sample_and_score(cfg: Any, rows: list[dict[str, Any]], *, model_path: str | None, tokenizer: Any, n: int,
                     seed: int, engine: Any = None, rewards: Any = None, dist: Dist | None = None) -> Scored:
    """Sample n completions per row with the rollout engine and score them with cfg.rewards. `engine`: one
    already serving the policy (the RL trainer's, for `train.eval_every`; `rank_engine` for a sharded run),
    used and left open; `rewards`: a RewardSet already loaded for these rows.

    `dist` (several processes): each rank samples and scores its share of every engine call (`shares`), a
    failure on any rank stops every rank (`fail_together`), and every rank gets the whole `Scored`, in the
    order and with the numbers of one process (all-gather). Collective: every rank calls it with the same rows.
    """
    from gspo.rewards import RewardSet
    from gspo.training.distributed import Dist, all_gather_objects, fail_together

    d = dist or Dist()
    if d.sharded and engine is None:
        raise ValueError("sample_and_score on several processes samples with the caller's engine (rank_engine), "
                         "which must stay open until the collectives after it are done")
    columns = sorted({c for row in rows for c in row if c != "prompt"})
    base_dir = os.path.dirname(os.path.abspath(cfg.source_path)) if cfg.source_path else None
    mode = cfg.data.chat_template
    step = cfg.rollout.prompts_per_step
    parts = shares(len(rows), step, d)
    own_engine = engine is None
    pieces: list[dict[str, Any]] = []
    with fail_together(d, "sampling and scoring"):  # engines and reward functions on this rank's share
        if rewards is None:
            rewards = RewardSet.from_specs(cfg.rewards, columns=columns, base_dir=base_dir)
        if d.main:
            logger.info("%s", describe_prompt_format(rows, mode, tokenizer))
        if parts:
            ids = [prompt_token_ids(tokenizer, row["prompt"], mode) for row in rows]  # as the RL trainer renders them
            if own_engine:
                engine = open_engine(cfg, model_path, tokenizer, max(len(p) for p in ids))
            try:
                pieces = [_sample_part(cfg, engine, rewards, tokenizer, rows, ids, columns, n, seed, b, lo, hi)
                          for b, lo, hi in parts]
            finally:
                if own_engine:
                    engine.close()
    if d.sharded:  # rank order within a call is prompt order, and calls are in order
        gathered = all_gather_objects(pieces, d)
        pieces = sorted((p for rank in gathered for p in rank), key=lambda p: p["lo"])
    completions = [t for p in pieces for t in p["completions"]]
    per_function: dict[str, list[float]] = {}
    for p in pieces:
        for name, values in p["per_function"].items():
            per_function.setdefault(name, []).extend(values)
    total = [v for p in pieces for v in p["rewards"]]
    metrics = {f"rewards/{name}/mean": _nanmean(v) for name, v in per_function.items()}
    metrics["reward/mean"] = _nanmean(total)
    return Scored(rows, n, completions, [r for p in pieces for r in p["finish_reasons"]],
                  [k for p in pieces for k in p["num_tokens"]], total, per_function, metrics)


def _sample_part(cfg: Any, engine: Any, rewards: Any, tokenizer: Any, rows: list[dict[str, Any]],
                 ids: list[list[int]], columns: list[str], n: int, seed: int, b: int, lo: int, hi: int
                 ) -> dict[str, Any]:
    """Prompts [lo, hi) of engine call b (which starts at b * prompts_per_step), sampled and scored; plain
    lists (they are gathered across ranks)."""
    from gspo.rollout import SamplingSpec

    r = cfg.rollout
    chunk = rows[lo:hi]
    sampling = SamplingSpec(n=n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, seed=seed * 100_003 + b, first_prompt=lo - b * r.prompts_per_step,
                            logprobs=False)  # scored by text: the sampler's logprobs are not read
    batch = engine.generate(ids[lo:hi], sampling)
    conversational = isinstance(chunk[0]["prompt"], list)
    texts = batch.completions
    result = rewards([row["prompt"] for row in chunk for _ in range(n)],
                     [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts,
                     [c[m.bool()].tolist() for c, m in zip(batch.completion_ids, batch.mask)],
                     {c: [row.get(c) for row in chunk for _ in range(n)] for c in columns})
    return {"lo": lo, "completions": list(texts), "finish_reasons": list(batch.finish_reasons),
            "num_tokens": [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts],
            "rewards": result.rewards.tolist(),
            "per_function": {name: values.tolist() for name, values in result.per_function.items()}}


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


# -- run_eval ------------------------------------------------------------------------------------------------


def run_eval(cfg: Any, *, model_path: str | None = None, output_dir: str | None = None) -> dict[str, Any]:
    """pass@k and mean rewards of a checkpoint (`model_path`, default cfg.model) on cfg.data with cfg.rewards.

    Writes `<output_dir or cfg.output_dir>/eval.json` and returns the same dict: `pass@<k>` per k in eval.k,
    `rewards/<name>/mean` per reward, `reward/mean`, `completions/mean_length`, `truncated_rate`, the settings
    (model, num_prompts, num_samples, pass_reward, pass_threshold) and `per_prompt` pass counts.

    Several processes (torchrun / accelerate launch): every process must call it; each samples and scores its
    share of the prompts (`sample_and_score`), every one returns the numbers of one process, and rank 0 alone
    writes eval.json.
    """
    from gspo.training.distributed import fail_together, init_distributed, main_first

    e = cfg.eval
    start = time.perf_counter()
    d = init_distributed()
    out_dir = output_dir or cfg.output_dir
    rows = eval_rows(cfg)
    path, tokenizer = main_first(d, "loading the model", lambda: load_model_ref(cfg, model_path))
    with rank_engine(cfg, path, tokenizer, rows, d) as engine:
        scored = sample_and_score(cfg, rows, model_path=path, tokenizer=tokenizer, n=e.num_samples, seed=e.seed,
                                  engine=engine, dist=d)
        result: dict[str, Any] = {"model": path, **summarize(cfg, scored)}
        result["time_s"] = time.perf_counter() - start
        result["per_prompt"] = result.pop("per_prompt")  # last in eval.json, as before
        with fail_together(d, "writing eval.json"):  # before the engine closes (rank_engine)
            if d.main:
                os.makedirs(out_dir, exist_ok=True)
                with open(os.path.join(out_dir, "eval.json"), "w", encoding="utf-8") as f:
                    json.dump(result, f, indent=1)
    return result


def eval_rows(cfg: Any) -> list[dict[str, Any]]:
    """The prompts an evaluation uses: cfg.data drawn with eval.seed, the first eval.num_prompts."""
    rows = build_dataset(cfg.data, seed=cfg.eval.seed).rows
    return rows[: cfg.eval.num_prompts] if cfg.eval.num_prompts else rows


def summarize(cfg: Any, scored: Scored) -> dict[str, Any]:
    """pass@k per k in eval.k, mean rewards, lengths, truncation rate and per-prompt pass counts."""
    e, rows = cfg.eval, scored.rows
    pass_name = e.pass_reward or next(iter(scored.per_function))
    if pass_name not in scored.per_function:
        raise ValueError(f"eval.pass_reward={pass_name!r} is not a configured reward; configured: "
                         f"{', '.join(scored.per_function)}")
    values = scored.per_function[pass_name]
    n = e.num_samples
    # NaN (abstained / skipped) never passes: >= is False for NaN.
    passes = [sum(v >= e.pass_threshold for v in values[b * n:(b + 1) * n]) for b in range(len(rows))]
    result: dict[str, Any] = {"num_prompts": len(rows), "num_samples": n, "pass_reward": pass_name,
                              "pass_threshold": e.pass_threshold}
    for k in e.k:
        if not 1 <= k <= n:
            raise ValueError(f"eval.k contains {k}; every k must be in 1..eval.num_samples={n}")
        result[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in passes) / len(passes)
    result.update(scored.metrics)
    result["completions/mean_length"] = sum(scored.num_tokens) / len(scored.num_tokens)
    result["truncated_rate"] = scored.finish_reasons.count("length") / len(scored.finish_reasons)
    result["per_prompt"] = [{"prompt": row["prompt"], "passed": c} for row, c in zip(rows, passes)]
    return result
