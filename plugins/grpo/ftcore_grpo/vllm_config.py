"""``[grpo.vllm]``: the vLLM server the ``vllm`` generation backend talks to."""

from __future__ import annotations

from ftcore.config import Section


class VLLMSection(Section):
    """``[grpo.vllm]``: how to reach (or start) the vLLM server."""

    url: str | None = None
