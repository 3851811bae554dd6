"""The generated config reference shows a plugin table's nested tables ([grpo.vllm]) as tables of their own."""

from ftcore.config import Section, build_config_model, config_reference
from pydantic import Field


class Inner(Section):
    """``[demo.server]``: where the server is."""

    url: str | None = Field(None, description="Its URL.")


class Demo(Section):
    """``[demo]``: a plugin table."""

    steps: int = Field(3, description="Steps.")
    server: Inner = Field(default_factory=Inner, description="The server.")


def test_nested_tables_get_their_own_section():
    page = config_reference(build_config_model({"demo": Demo}), only="demo")
    assert "| `server` | table `[demo.server]` (below) | | The server. |" in page
    assert "## `[demo.server]`\n\nWhere the server is.\n\n| key | type | default | description |" in page
    assert "| `url` | string | not set | Its URL. |" in page
