"""Built-in dataset row formats, registered through the same registry external plugins use."""

from ftcore.hookspecs import hookimpl

FORMAT_CLASSES = {
    "messages": "Messages",
    "sharegpt": "ShareGPT",
    "alpaca": "Alpaca",
    "completion": "Completion",
    "prompt_completion": "PromptCompletion",
    "pretokenized": "Pretokenized",
    "prompt": "Prompt",
    "synthetic": "Synthetic",
}


@hookimpl
def register_formats(register):
    for name, class_name in FORMAT_CLASSES.items():
        register(name, f"ftcore.data.formats:{class_name}")
