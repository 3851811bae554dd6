"""``ftcore env``: versions of the stack and warnings about combinations known to break."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, distribution, version

from ftcore import __version__
from ftcore.plugins import installed_plugins

LIBRARIES = (
    "torch", "transformers", "peft", "trl", "accelerate", "datasets", "triton", "liger-kernel", "cut-cross-entropy",
    "bitsandbytes", "pydantic", "pluggy",
)  # fmt: skip


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def describe_environment() -> list[str]:
    """One line per component, then warnings for combinations known to break."""
    lines = [f"ftcore {__version__}", f"python {platform.python_version()} ({platform.platform()})"]
    for name, ep in sorted(installed_plugins().items()):
        lines.append(
            f"plugin {name}: {ep.dist.name if ep.dist else '?'} {ep.dist.version if ep.dist else ''}".rstrip()
        )
    versions = {lib: _version(lib) for lib in LIBRARIES}
    for lib, ver in versions.items():
        lines.append(f"{lib} {ver or 'not installed'}")
    if versions["torch"]:
        import torch

        cuda = torch.version.cuda or "none"
        devices = (
            ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"
        )
        lines.append(f"cuda {cuda} ({devices})")
    torchvision = _version("torchvision")
    if torchvision and "+cpu" in (versions["torch"] or "") and "+cpu" not in torchvision:
        lines.append(
            "warning: torchvision from PyPI does not import beside a CPU build of torch; uninstall it"
        )
    dists = ["ftcore", *(ep.dist.name for ep in installed_plugins().values() if ep.dist), *LIBRARIES]
    lines += requirement_warnings(dict.fromkeys(dists))
    return lines


def requirement_warnings(dists) -> list[str]:
    """Warnings for the requirements of ``dists`` that the installed versions break."""
    from packaging.requirements import Requirement

    warnings = []
    for name in dists:
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            installed = _version(req.name)
            if installed and not req.specifier.contains(installed, prereleases=True):
                found = f"{req.name} {installed} is installed"
                warnings.append(f"warning: {name} {version(name)} requires {req}, but {found}")
    return warnings
