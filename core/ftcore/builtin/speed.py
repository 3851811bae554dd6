"""Built-in speed features: regional ``torch.compile`` of the decoder layers (``model.compile``)."""

from ftcore.hookspecs import hookimpl


@hookimpl
def after_model_load(config, model):
    if config.model.compile:
        from ftcore.speed import compile_decoder_layers

        compile_decoder_layers(model)
