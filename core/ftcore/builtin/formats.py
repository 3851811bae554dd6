"""Built-in dataset row formats, registered through the same registry external plugins use."""

from ftcore.hookspecs import hookimpl


@hookimpl
def register_formats(register):
    pass
