"""The rl trainer's periodic evaluation (`train.eval_every`): pass@k and mean rewards of the current policy on the
evaluation prompts, sampled by the run's own engine after a weight sync, logged as `eval/<key>`."""

from __future__ import annotations

import os

from gspo.rewards import RewardSet
from gspo.training.distributed import fail_together


class PeriodicEval:
    """Methods of `GSPOTrainer` (they read its cfg, tokenizer and engine)."""

    def _init_eval(self) -> None:
        """The eval config (train.eval_config, else this run's own), its prompts and its rewards, loaded once."""
        self.eval_cfg = None
        t = self.cfg.train
        if not t.eval_every:
            return
        from gspo.config import load_config
        from gspo.training.evaluation import eval_rows

        ev = load_config(t.eval_config) if t.eval_config else self.cfg
        self.eval_cfg, self.eval_rows = ev, eval_rows(ev)
        columns = sorted({c for r in self.eval_rows for c in r if c != "prompt"})
        base = os.path.dirname(os.path.abspath(ev.source_path)) if ev.source_path else None
        self.eval_rewards = RewardSet.from_specs(ev.rewards, columns=columns, base_dir=base)

    def evaluate(self) -> dict[str, float]:
        """pass@k and mean rewards of the current policy (the engine holds its weights after the sync),
        as `eval/<key>`; the same numbers as `gspo eval` (gspo.training.evaluation.summarize)."""
        from gspo.training.evaluation import sample_and_score, summarize

        ev = self.eval_cfg
        scored = sample_and_score(ev, self.eval_rows, model_path=None, tokenizer=self.tokenizer,
                                  n=ev.eval.num_samples, seed=ev.eval.seed, engine=self.engine,
                                  rewards=_ScoredTogether(self.eval_rewards, self.dist))
        settings = ("num_prompts", "num_samples", "pass_threshold")
        return {f"eval/{k}": float(v) for k, v in summarize(ev, scored).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in settings}


class _ScoredTogether:
    """The evaluation's RewardSet, each call inside `fail_together`: every rank samples and scores the same
    chunks in the same order (on several processes), so a reward raising on one rank stops every rank at that
    chunk instead of leaving the others in the next chunk's sampling. Scoring holds no collective."""

    def __init__(self, rewards: RewardSet, dist) -> None:
        self.rewards, self.dist = rewards, dist

    def __call__(self, *args, **kwargs):
        with fail_together(self.dist, "the evaluation's rewards"):
            return self.rewards(*args, **kwargs)
