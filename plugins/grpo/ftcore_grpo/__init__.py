"""ftcore plugin `grpo`: online RL (GRPO and its loss family) with HF or vLLM generation."""
