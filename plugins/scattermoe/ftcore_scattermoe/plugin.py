"""Hook implementations of the `scattermoe` plugin (kept light: heavy imports inside hooks).

Enabling the plugin selects the ``scattermoe`` experts implementation for the model; the
``[scattermoe]`` table holds options only.
"""

from __future__ import annotations

from typing import Literal

from ftcore.config import Section
from ftcore.errors import PluginError
from ftcore.hookspecs import hookimpl
from pydantic import Field


class ScatterMoESection(Section):
    """``[scattermoe]``: options of the ScatterMoE Triton expert kernels (enabling the plugin selects them)."""

    expert_lora: bool = Field(
        True,
        description="Run peft LoRA on expert parameters (adapter.target_parameters such as experts.gate_up_proj) "
        "through the fused kernels; false keeps peft's generic path.",
    )
    autotune: bool = Field(
        True,
        description="Autotune kernel tile sizes (pruned search, cached on disk); false uses fixed tiles.",
    )
    full_finetuning: Literal["grouped_mm", "kernels"] = Field(
        "grouped_mm",
        description="Experts whose own weights train (no LoRA on them): transformers' grouped_mm, faster on "
        "every measured shape (the kernels ran at 0.74-1.03x of it on an H200), or the ScatterMoE kernels, "
        "which hold less memory.",
    )


@hookimpl
def config_section():
    return ScatterMoESection


@hookimpl
def model_load_kwargs(config, kwargs):
    from ftcore_scattermoe import experts

    experts.register()
    current = kwargs.get("experts_implementation")
    if current not in (None, experts.IMPLEMENTATION):
        raise PluginError(
            f"experts_implementation is already set to {current!r}; the plugin sets {experts.IMPLEMENTATION!r}. "
            "Enable only one experts kernel plugin.",
            plugin="scattermoe",
        )
    kwargs["experts_implementation"] = experts.IMPLEMENTATION


@hookimpl
def patch_model(config, model):
    from ftcore_scattermoe import experts

    count = experts.check_model(
        model, autotune=config.scattermoe.autotune, full_finetuning=config.scattermoe.full_finetuning
    )
    print(f"ftcore: scattermoe: {count} experts modules run on the ScatterMoE kernels")


@hookimpl
def after_model_load(config, model):
    if not config.scattermoe.expert_lora:
        return
    from ftcore_scattermoe import experts

    count = experts.install_expert_lora(model)
    if count:
        print(f"ftcore: scattermoe: LoRA on {count} experts modules runs in the fused kernels")
