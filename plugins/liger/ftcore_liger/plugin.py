"""Hook implementations of the `liger` plugin (kept light: heavy imports inside hooks)."""

from ftcore.hookspecs import hookimpl  # noqa: F401
