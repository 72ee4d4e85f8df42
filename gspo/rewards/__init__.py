"""Rewards (hop 3 of a step): the plug-in contract, loading, weighting and the failure policy.

Contract (TRL's, so functions written for TRL work unchanged):
    fn(prompts, completions, completion_ids, **columns) -> list[float | None]
Every dataset column arrives as a keyword (already repeated per completion, length N); `None` means the
function abstains for that sample; `async def` functions run concurrently. Completions are strings or
conversational message lists ([{"role": "assistant", "content": ...}]); `completion_text` reads both.

On top of TRL:
- a start-up check: a parameter that is neither a standard argument, a dataset column nor a configured
  keyword is an error naming the function, the parameter and the columns (TRL lets it vanish into **kwargs);
- a per-function failure policy (`on_error`: error | zero | skip) for exceptions, NaN/inf, wrong lengths,
  wrong types and time-outs, with the affected samples counted in `rewards/<name>/errors`.

Weighting: the reward of sample i is sum_f w_f r_f(i) over the functions that did not abstain on i, NOT
renormalized by the weights present (TRL does the same nansum). Renormalizing would silently rescale the
remaining functions: a format reward of weight 0.1 would become worth 1.0 on the samples where accuracy
abstains, so those samples would outrank correct ones in their group. When every function abstains the reward
is NaN, which the advantage code treats as missing (advantage 0, never NaN).

Modules: `loading` (references, specs, the start-up check), `running` (`RewardSet`: calling, validating,
weighting), `text` (reading either format). The names reward authors and callers use are importable from
`gspo.rewards` itself.
"""

from gspo.rewards.loading import (
    DEFAULT_REWARD_TIMEOUT_S,
    RewardLoadError,
    load_reward_fn,
    register_reward,
    reward_name,
)
from gspo.rewards.running import RewardError, RewardResult, RewardSet
from gspo.rewards.text import completion_text, prompt_text
