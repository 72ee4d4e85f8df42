"""The policy model: loading any HF causal LM, tiny MoE checkpoints (`gspo.models.loading`) and LoRA
(`gspo.models.lora`)."""
