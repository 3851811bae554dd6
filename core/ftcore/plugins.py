"""Plugin manager: discovery through entry points, enabling by name, registries, tracing.

Installed plugins are listed from package metadata (entry-point group ``ftcore``) without
importing them. A plugin is imported only when it is enabled (listed in ``plugins``), listed
by ``ftcore plugins``, or asked for its CLI commands. Core features are built-in plugins,
registered the same way and always on.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from ftcore import __version__, hookspecs
from ftcore.errors import PluginError, did_you_mean

ENTRY_POINT_GROUP = "ftcore"
BUILTIN_PLUGINS = {
    "core.formats": "ftcore.builtin.formats",
    "core.model": "ftcore.builtin.model",
    "core.sft": "ftcore.builtin.sft",
    "core.speed": "ftcore.builtin.speed",
}
REGISTRY_HOOKS = {"format": "register_formats", "method": "register_methods", "reward": "register_rewards"}


@dataclass
class PluginInfo:
    """What ``ftcore plugins`` shows about one plugin."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    config_table: str | None = None
    error: str | None = None


def installed_plugins() -> dict[str, Any]:
    """Entry points of the ``ftcore`` group by name (nothing is imported)."""
    return dict(_entry_points(tuple(sys.path)))


@functools.lru_cache(maxsize=8)
def _entry_points(search_path: tuple[str, ...]) -> dict[str, Any]:
    """Reading every distribution's metadata takes milliseconds: once per ``sys.path``."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def import_target(target: str) -> Any:
    """Import ``"package.module"`` or ``"package.module:attribute.path"``."""
    module_path, _, attribute = target.partition(":")
    obj = importlib.import_module(module_path)
    for part in attribute.split(".") if attribute else ():
        obj = getattr(obj, part)
    return obj


def _import_plugin(name: str, target: str, distribution: str | None):
    try:
        return import_target(target)
    except Exception as exc:
        source = f"distribution {distribution!r}, " if distribution else ""
        message = f"failed to import ({source}{target!r}): {type(exc).__name__}: {exc}"
        raise PluginError(message, plugin=name) from exc


def _load_entry_point(name: str, ep) -> Any:
    return _import_plugin(name, ep.value, ep.dist.name if ep.dist else None)


class Plugins:
    """The plugins of one run: built-ins plus the enabled ones, with their registries."""

    def __init__(self, enabled: list[str] | tuple[str, ...] = (), *, trace: bool | None = None):
        self.pm = pluggy.PluginManager("ftcore")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._registries: dict[str, Registry] = {}
        for name, module_path in BUILTIN_PLUGINS.items():
            self._register(name, importlib.import_module(module_path), "ftcore", __version__, builtin=True)
        installed = installed_plugins()
        for name in enabled:
            self.enable(name, installed)
        self._check_pending()
        if trace if trace is not None else os.environ.get("FTCORE_TRACE_HOOKS") == "1":
            _add_tracing(self.pm)

    def enable(self, name: str, installed: dict[str, Any] | None = None) -> None:
        """Enable a plugin by entry-point name or dotted module path."""
        installed = installed_plugins() if installed is None else installed
        if name in installed:
            ep = installed[name]
            dist, version = (ep.dist.name, ep.dist.version) if ep.dist else (None, None)
            self._register(name, _load_entry_point(name, ep), dist, version, builtin=False)
        elif "." in name:
            module = _import_plugin(name, name, None)
            plugin_name = getattr(module, "name", None) or name
            self._register(plugin_name, module, None, None, builtin=False, module_path=name)
        else:
            choices = sorted(installed)
            raise PluginError(
                f"not installed{did_you_mean(name, choices)}. Installed plugins: {', '.join(choices) or 'none'}. "
                "Install it with pip, or give an in-house plugin as a dotted module path.",
                plugin=name,
            )

    def _register(self, name, plugin, dist, version, *, builtin, module_path=None):
        if name in self.infos or self.pm.is_registered(plugin):
            return
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"invalid hook implementation: {exc}", plugin=name) from exc
        self.infos[name] = _info(name, plugin, dist, version, builtin=builtin, module_path=module_path)

    def _check_pending(self) -> None:
        """Like ``pm.check_pending()``, with the plugin's name and the closest hook name."""
        callers = {name: caller for name, caller in vars(self.pm.hook).items() if not name.startswith("_")}
        specs = [name for name, caller in callers.items() if caller.has_spec()]
        for name, caller in callers.items():
            for impl in [] if caller.has_spec() else caller.get_hookimpls():
                if not impl.optionalhook:
                    raise PluginError(
                        f"its hook implementation {name!r} matches no hook spec{did_you_mean(name, specs)}; "
                        "the hooks are listed in ftcore/hookspecs.py",
                        plugin=impl.plugin_name,
                    )

    @property
    def hook(self):
        return self.pm.hook

    @property
    def enabled(self) -> list[str]:
        """Names of the enabled, non-built-in plugins, in order."""
        return [name for name, info in self.infos.items() if not info.builtin]

    def call_one(self, hook_name: str, plugin_name: str, **kwargs) -> Any:
        """Call a hook on one plugin only (tracing still applies); its result or None."""
        plugin = self.pm.get_plugin(plugin_name)
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        result = self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)
        return (result[0] if result else None) if isinstance(result, list) else result

    def call_each(self, hook_name: str, **kwargs) -> dict[str, Any]:
        """Call a hook on each plugin separately; return {plugin name: result} (None omitted)."""
        results = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            value = self.call_one(hook_name, impl.plugin_name, **kwargs)
            if value is not None:
                results[impl.plugin_name] = value
        return results

    def config_sections(self) -> dict[str, type]:
        """{table name: pydantic model} of the enabled plugins that declare a table."""
        return self.call_each("config_section")

    def registry(self, kind: str) -> Registry:
        """The registry of ``kind`` ("format", "method", "reward"), built on first use."""
        if kind not in self._registries:
            self._registries[kind] = Registry(kind, self)
        return self._registries[kind]


class Registry:
    """Names to import strings or objects, each owned by one plugin."""

    def __init__(self, kind: str, plugins: Plugins):
        self.kind = kind
        self.entries: dict[str, tuple[Any, str]] = {}
        self._plugins = plugins
        hook_name = REGISTRY_HOOKS[kind]
        for impl in getattr(plugins.pm.hook, hook_name).get_hookimpls():
            plugins.call_one(hook_name, impl.plugin_name, register=self._register_for(impl.plugin_name))

    def _register_for(self, plugin_name: str):
        def register(name: str, target: Any) -> None:
            if name in self.entries and self.entries[name][1] != plugin_name:
                raise PluginError(
                    f"{self.kind} {name!r} is registered by both {self.entries[name][1]!r} and {plugin_name!r}; "
                    "disable one of them.",
                    plugin=plugin_name,
                )
            self.entries[name] = (target, plugin_name)

        return register

    def names(self) -> list[str]:
        return sorted(self.entries)

    def owner(self, name: str) -> str:
        self._check(name)
        return self.entries[name][1]

    def get(self, name: str) -> Any:
        """The registered object, importing it if it was registered as an import string."""
        self._check(name)
        target, plugin_name = self.entries[name]
        if isinstance(target, str):
            try:
                return import_target(target)
            except Exception as exc:
                raise PluginError(
                    f"cannot import {self.kind} {name!r} from {target!r}: {type(exc).__name__}: {exc}",
                    plugin=plugin_name,
                ) from exc
        return target

    def _check(self, name: str) -> None:
        if name in self.entries:
            return
        providers = disabled_providers(self.kind, name, set(self._plugins.infos))
        if len(providers) == 1:
            raise PluginError(
                f'{self.kind} "{name}" is provided by the plugin "{providers[0]}", which is not enabled: '
                f'add it to plugins, e.g. plugins = ["{providers[0]}"].'
            )
        if providers:
            raise PluginError(
                f'{self.kind} "{name}" is provided by the plugins {", ".join(map(json.dumps, providers))}, '
                "which are not enabled: add one of them to plugins."
            )
        raise PluginError(
            f'unknown {self.kind} "{name}"{did_you_mean(name, self.entries)}. '
            f"Available: {', '.join(self.names()) or 'none'}."
        )


def disabled_providers(kind: str, name: str, enabled: set[str]) -> list[str]:
    """The installed but disabled plugins that register ``kind`` ``name``."""
    providers = []
    for plugin_name in sorted(installed_plugins()):
        if plugin_name in enabled:
            continue
        try:
            entries = Plugins([plugin_name], trace=False).registry(kind).entries
        except PluginError:  # a broken plugin cannot be the provider; its error shows when enabled
            continue
        if name in entries and entries[name][1] == plugin_name:
            providers.append(plugin_name)
    return providers


def _info(name: str, plugin, dist, version, *, builtin: bool, module_path: str | None = None) -> PluginInfo:
    hooks = sorted(n for n in dir(plugin) if _is_hookimpl(getattr(plugin, n, None)))
    return PluginInfo(
        name=name,
        module=module_path or getattr(plugin, "__name__", type(plugin).__name__),
        distribution=dist,
        version=version,
        builtin=builtin,
        hooks=hooks,
    )


def describe_installed() -> list[PluginInfo]:
    """PluginInfo of every built-in and installed plugin; a plugin that fails to load carries its error."""
    infos = list(Plugins(trace=False).infos.values())
    for name, ep in sorted(installed_plugins().items()):
        try:
            plugins = Plugins([name], trace=False)
        except PluginError as exc:
            dist, version = (ep.dist.name, ep.dist.version) if ep.dist else (None, None)
            infos.append(PluginInfo(name, ep.value, dist, version, builtin=False, error=str(exc)))
            continue
        info = plugins.infos[name]
        info.config_table = name if name in plugins.config_sections() else None
        infos.append(info)
    return infos


def load_installed(on_error) -> Plugins:
    """Plugins with every installed plugin enabled; each one that fails to load goes to ``on_error``."""
    loadable = []
    for name in sorted(installed_plugins()):
        try:
            Plugins([name], trace=False)
            loadable.append(name)
        except PluginError as exc:
            on_error(exc)
    return Plugins(loadable)


def plugin_commands(cli) -> None:
    """Let every built-in and installed plugin add CLI commands; a broken plugin is reported, not fatal."""

    def warn(exc: PluginError) -> None:
        print(f"ftcore: warning: {exc} (its commands are left out)", file=sys.stderr)

    load_installed(warn).hook.register_commands(cli=cli)


def _is_hookimpl(obj) -> bool:
    return callable(obj) and hasattr(obj, "ftcore_impl")


def _add_tracing(pm: pluggy.PluginManager) -> None:
    starts: list[float] = []

    def before(hook_name, hook_impls, kwargs):
        starts.append(time.perf_counter())
        names = ", ".join(impl.plugin_name for impl in hook_impls)
        print(f"[ftcore hook] {hook_name}({', '.join(kwargs)}) -> [{names}]", file=sys.stderr)

    def after(outcome, hook_name, hook_impls, kwargs):
        elapsed = (time.perf_counter() - starts.pop()) * 1000
        status = "raised " + type(outcome.exception).__name__ if outcome.exception else "ok"
        print(f"[ftcore hook] {hook_name} {status} in {elapsed:.1f} ms", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)
