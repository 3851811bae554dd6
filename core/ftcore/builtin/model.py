"""Built-in Hugging Face model loader and peft adapters."""
