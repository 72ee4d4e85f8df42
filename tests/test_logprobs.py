"""completion_logprobs: equals a naive full-logits reference, chunking is invisible, gradients flow, and no
[N, T, V]-sized logits tensor is ever allocated."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from gspo.models.loading import build_tiny_model
from gspo.training.logprobs import completion_logprobs

PAD = 0


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def model(request, tmp_path_factory):
    path = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def random_batch(seed: int, *, num_prompts=3, group_size=2, max_prompt=7, t=6, vocab=100):
    """Prompts of random lengths, completions right-padded to random lengths (at least one token)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, vocab, (int(torch.randint(1, max_prompt + 1, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(num_prompts)]
    n = num_prompts * group_size
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    completion_ids = torch.randint(5, vocab, (n, t), generator=g) * mask.long() + PAD * (1 - mask.long())
    return prompts, completion_ids, mask


def naive_logprobs(model, prompts, completion_ids, mask, group_size, temperature=1.0):
    """One unpadded sequence at a time, full [L, V] logits, log_softmax, gather."""
    out = torch.zeros(completion_ids.shape)
    for i in range(completion_ids.shape[0]):
        prompt = prompts[i // group_size]
        n_tok = int(mask[i].sum())
        seq = torch.tensor(prompt + completion_ids[i, :n_tok].tolist())[None]
        logp = (model(seq).logits[0].float() / temperature).log_softmax(-1)
        for t in range(n_tok):
            out[i, t] = logp[len(prompt) - 1 + t, completion_ids[i, t]]
    return out


@pytest.mark.parametrize("seed,temperature", [(0, 1.0), (1, 0.7), (2, 1.3)])
def test_matches_naive_reference(model, seed, temperature):
    prompts, ids, mask = random_batch(seed)
    with torch.no_grad():
        got = completion_logprobs(model, prompts, ids, mask, group_size=2, pad_token_id=PAD, chunk_size=4,
                                  temperature=temperature)
        ref = naive_logprobs(model, prompts, ids, mask, 2, temperature)
    assert got.dtype == torch.float32 and got.shape == ids.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert torch.all(got[mask == 0] == 0)
    assert torch.all(got[mask == 1] < 0)


def test_chunk_size_does_not_change_results(model):
    prompts, ids, mask = random_batch(3, num_prompts=4, group_size=3)
    with torch.no_grad():
        results = [completion_logprobs(model, prompts, ids, mask, group_size=3, pad_token_id=PAD, chunk_size=c)
                   for c in (1, 5, 100)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-6, rtol=0)


def test_gradient_matches_reference(model):
    """Under grad the (checkpointed) chunks give the same gradient as the naive reference."""
    prompts, ids, mask = random_batch(4)
    weights = torch.linspace(-1, 1, ids.numel()).reshape(ids.shape)  # a loss that weights tokens differently
    model.zero_grad()
    (completion_logprobs(model, prompts, ids, mask, group_size=2, pad_token_id=PAD, chunk_size=2)
     * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (naive_logprobs(model, prompts, ids, mask, 2) * weights).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert got.keys() == ref.keys()
    assert any("experts" in n for n in got) and any("lm_head" in n for n in got)
    for name, ref_grad in ref.items():
        torch.testing.assert_close(got[name], ref_grad, atol=2e-5, rtol=1e-3, msg=name)
    assert any(g.abs().sum() > 0 for n, g in got.items() if "experts" in n)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the largest number of rows of any op output whose last dim is the vocab size (weights, views
    of them and the [H, V] lm_head weight gradient excluded): full-batch logits would show N * T rows."""

    def __init__(self, vocab: int, hidden: int, exclude_ptrs: set[int]):
        super().__init__()
        self.vocab, self.hidden, self.exclude, self.max_rows = vocab, hidden, exclude_ptrs, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and tuple(t.shape) != (self.hidden, self.vocab)
                    and t.untyped_storage().data_ptr() not in self.exclude):
                self.max_rows = max(self.max_rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_never_materializes_full_logits(model, grad):
    vocab = model.config.vocab_size
    num_prompts, group_size, t, chunk = 4, 2, 8, 2
    prompts, ids, mask = random_batch(5, num_prompts=num_prompts, group_size=group_size, t=t)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    mode = _LargestVocabTensor(vocab, model.config.hidden_size, exclude)
    with torch.set_grad_enabled(grad), mode:
        logp = completion_logprobs(model, prompts, ids, mask, group_size=group_size, pad_token_id=PAD,
                                   chunk_size=chunk)
        if grad:
            logp.sum().backward()
    model.zero_grad()
    n = num_prompts * group_size
    assert 0 < mode.max_rows <= chunk * t < n * t  # one chunk of completion positions at a time
    # The check can fail: a plain forward does allocate full-batch logits.
    full = _LargestVocabTensor(vocab, model.config.hidden_size, exclude)
    with torch.no_grad(), full:
        model(ids)
    assert full.max_rows >= n * t


def test_router_logits_passthrough(model):
    prompts, ids, mask = random_batch(6)
    with torch.no_grad():
        res = completion_logprobs(model, prompts, ids, mask, group_size=2, pad_token_id=PAD,
                                  output_router_logits=True, return_outputs=True)
        plain = completion_logprobs(model, prompts, ids, mask, group_size=2, pad_token_id=PAD)
    torch.testing.assert_close(res.logp, plain)
    router = res.outputs.router_logits
    assert len(router) == model.config.num_hidden_layers
    n_tokens = res.attention_mask.numel()
    assert all(r.shape[0] == n_tokens for r in router)
    assert res.attention_mask.shape == (ids.shape[0], max(len(p) for p in prompts) + ids.shape[1])


def test_errors_name_the_problem(model):
    prompts, ids, mask = random_batch(7)
    with pytest.raises(ValueError, match="group_size"):
        completion_logprobs(model, prompts, ids, mask, group_size=3, pad_token_id=PAD)
    with pytest.raises(ValueError, match="chunk_size"):
        completion_logprobs(model, prompts, ids, mask, group_size=2, pad_token_id=PAD, chunk_size=0)


def naive_truncated(logits_row: torch.Tensor, target: int, temperature: float, top_k: int, top_p: float) -> float:
    """The sampler's distribution written out by hand: z/τ, keep the top_k largest (ties with the k-th kept),
    then the smallest set of most likely tokens whose probability reaches top_p, renormalise."""
    z = logits_row.double() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k > 0:
        keep &= z >= torch.topk(z, top_k).values[-1]
    if top_p < 1.0:
        p = torch.where(keep, z, float("-inf")).softmax(-1)
        order = torch.argsort(p, descending=True)
        mass, nucleus = 0.0, torch.zeros_like(keep)
        for idx in order.tolist():
            nucleus[idx] = True
            mass += float(p[idx])
            if mass >= top_p:
                break
        keep &= nucleus
    return float(torch.where(keep, z, float("-inf")).log_softmax(-1)[target])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, -1, 0.8), (1.3, 20, 0.9), (0.7, 3, 0.5)])
def test_truncated_sampler_distribution_matches_a_hand_written_reference(model, temperature, top_k, top_p):
    prompts, ids, mask = random_batch(3)
    with torch.no_grad():  # even rows: the greedy continuation (always inside the kept set); odd rows: random
        for i in range(0, ids.shape[0], 2):
            seq = list(prompts[i // 2])
            for t in range(int(mask[i].sum())):
                ids[i, t] = int(model(torch.tensor(seq)[None]).logits[0, -1].argmax())
                seq.append(int(ids[i, t]))
        got = completion_logprobs(model, prompts, ids, mask, group_size=2, pad_token_id=PAD,
                                  temperature=temperature, top_k=top_k, top_p=top_p)
        full = completion_logprobs(model, prompts, ids, mask, group_size=2, pad_token_id=PAD, temperature=temperature)
    want = torch.zeros_like(got)
    for i in range(ids.shape[0]):
        prompt, n_tok = prompts[i // 2], int(mask[i].sum())
        logits = model(torch.tensor(prompt + ids[i, :n_tok].tolist())[None]).logits[0].float().detach()
        for t in range(n_tok):
            want[i, t] = naive_truncated(logits[len(prompt) - 1 + t], int(ids[i, t]), temperature, top_k, top_p)
    inside = torch.isfinite(want) & mask.bool()  # drawn-by-the-sampler tokens: inside the kept set
    assert bool(inside[::2][mask[::2].bool()].all())
    torch.testing.assert_close(got[inside], want[inside].float(), rtol=1e-5, atol=1e-5)
    # truncation renormalises: a kept token is more likely than under the full distribution
    assert bool((got[inside] > full[inside]).all())
    # outside the kept set (only possible off-policy) the value stays finite: no -inf / NaN in the loss
    assert bool(torch.isfinite(got).all())


def test_truncated_logprobs_have_finite_gradients(model):
    prompts, ids, mask = random_batch(4)
    logp = completion_logprobs(model, prompts, ids, mask, group_size=2, pad_token_id=PAD, temperature=0.7,
                               top_k=5, top_p=0.8)
    logp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad()


@pytest.mark.timeout(60)
def test_bf16_logits_fast_path_equals_an_fp32_copy_first():
    # Temperature 1 without truncation: log_softmax reads bf16 logits and writes fp32 in one kernel; values
    # and gradients must be those of casting the logits to fp32 first (the other path's first step).
    from gspo.training.logprobs import _chunk_logp

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    hidden = torch.randn(3, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5))
    fast = _chunk_logp(hidden, targets, head, 1.0, None)
    (grad_fast,) = torch.autograd.grad(fast.sum(), hidden)
    ref = head(hidden).float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (grad_ref,) = torch.autograd.grad(ref.sum(), hidden)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=0, atol=0)
    # A temperature takes the other path: log_softmax(z / 2) of the fp32 logits.
    hot = _chunk_logp(hidden, targets, head, 2.0, None)
    torch.testing.assert_close(hot, (head(hidden).float() / 2).log_softmax(-1).gather(-1, targets.unsqueeze(-1))
                               .squeeze(-1), rtol=0, atol=1e-6)
