"""The built-in ``sft`` method."""

from ftcore.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    register("sft", "ftcore.train:SFTMethod")
