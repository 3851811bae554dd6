"""``ftcore env``: versions of the stack and warnings about combinations known to break."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from ftcore import __version__
from ftcore.plugins import installed_plugins

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "triton", "pydantic", "pluggy")
MINIMUMS = {"transformers": (5, 0), "peft": (0, 21), "trl": (1, 0), "pydantic": (2, 0)}


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _major_minor(text: str) -> tuple[int, int]:
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def describe_environment() -> list[str]:
    lines = [f"ftcore {__version__}", f"python {platform.python_version()} ({platform.platform()})"]
    for name, ep in sorted(installed_plugins().items()):
        lines.append(f"plugin {name}: {ep.dist.name if ep.dist else '?'} {ep.dist.version if ep.dist else ''}".rstrip())
    versions = {lib: _version(lib) for lib in LIBRARIES}
    for lib, ver in versions.items():
        lines.append(f"{lib} {ver or 'not installed'}")
    if versions["torch"]:
        import torch

        cuda = torch.version.cuda or "none"
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"
        lines.append(f"cuda {cuda} ({devices})")
    for lib, minimum in MINIMUMS.items():
        if versions[lib] and _major_minor(versions[lib]) < minimum:
            lines.append(f"warning: {lib} {versions[lib]} is older than ftcore supports ({'.'.join(map(str, minimum))}+)")
    torchvision = _version("torchvision")
    if torchvision and "+cpu" in (versions["torch"] or "") and "+cpu" not in torchvision:
        lines.append("warning: torchvision from PyPI does not import beside a CPU build of torch; uninstall it")
    return lines
