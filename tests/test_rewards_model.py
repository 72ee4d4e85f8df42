"""The reward-model reward: a tiny sequence-classification model built locally, scored batched and one by one."""

import pytest
import torch
from gspo_rewards import reward_model as rm

from gspo.rewards import RewardSet

PROMPTS = ["What is 2+2?", "Say hi.", [{"role": "user", "content": "Name a colour."}], "Count to three."]
COMPLETIONS = ["<answer>4</answer>", "hi", [{"role": "assistant", "content": "red"}], "one two three, done!"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from gspo.models.loading import build_tokenizer

    out = tmp_path_factory.mktemp("tiny_rm")
    tokenizer = build_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(out)
    return str(out)


def test_batched_scores_equal_one_by_one(checkpoint):
    batched = rm.reward_model(PROMPTS, COMPLETIONS, model_path=checkpoint, batch_size=4)
    single = [rm.reward_model([p], [c], model_path=checkpoint, batch_size=1)[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert len(batched) == 4 and all(isinstance(s, float) for s in batched)
    assert batched == pytest.approx(single, abs=1e-5)
    assert len({round(s, 6) for s in batched}) > 1  # the texts really reach the model


def test_uses_its_own_chat_template_and_tokenizer(checkpoint):
    model, tokenizer = rm.load_reward_model(checkpoint)
    text = rm.format_pair(tokenizer, "What is 2+2?", "<answer>4</answer>")
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text  # the checkpoint's template
    assert rm.score_texts(model, tokenizer, [text]) == pytest.approx(
        rm.reward_model(["What is 2+2?"], ["<answer>4</answer>"], model_path=checkpoint), abs=1e-6)
    # Plain concatenation without a template gives a different input, hence a different score.
    tokenizer_no_template = type(tokenizer).from_pretrained(checkpoint)
    tokenizer_no_template.chat_template = None
    plain = rm.format_pair(tokenizer_no_template, "What is 2+2?", "<answer>4</answer>")
    assert plain == "What is 2+2?<answer>4</answer>"


def test_through_a_reward_set_with_weight(checkpoint):
    rs = RewardSet.from_specs([{"fn": "reward_model", "weight": 2.0, "kwargs": {"model_path": checkpoint}}],
                              columns=["answer"])
    out = rs(PROMPTS, COMPLETIONS, [[1]] * 4, {"answer": ["4", "hi", "red", "3"]})
    direct = torch.tensor(rm.reward_model(PROMPTS, COMPLETIONS, model_path=checkpoint))
    assert torch.allclose(out.rewards, 2.0 * direct, atol=1e-6)
    assert out.metrics["rewards/reward_model/mean"] == pytest.approx(direct.mean().item(), abs=1e-6)
