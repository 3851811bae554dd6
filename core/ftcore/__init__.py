"""ftcore: a plugin-kernel LLM post-training framework."""

__version__ = "0.1.0"
