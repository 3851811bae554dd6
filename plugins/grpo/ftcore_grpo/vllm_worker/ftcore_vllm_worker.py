"""ftcore's extension of vLLM's workers: ``--worker-extension-cls ftcore_vllm_worker.FtcoreWorkerExtension``.

Imported by the worker processes of a vLLM server, in vLLM's own environment: it imports nothing
from ftcore (ftcore puts this file's folder on the server's ``PYTHONPATH``). Its methods are called
through vLLM's ``POST /collective_rpc`` (``VLLM_SERVER_DEV_MODE=1``).
"""

VERSION = 1


class FtcoreWorkerExtension:
    def ftcore_extension_version(self) -> int:
        return VERSION

    def ftcore_reload_weights(self, weights_path: str) -> list:
        """``reload_weights(weights_path=...)``, then process tied layers again; returns their names.

        vLLM reloads a layer in place and processes it (on the CPU backend: packs its weight for
        oneDNN). A layer whose weight is tied to another's (``lm_head`` to ``embed_tokens`` with
        ``tie_word_embeddings``) receives no weights of its own, so it would keep computing with the
        packed copy of the old values: every layer of a tied group is processed again.
        """
        self.reload_weights(weights_path=weights_path)
        groups: dict = {}
        for name, module in self.model_runner.get_model().named_modules():
            weight = getattr(module, "weight", None)
            method = getattr(module, "quant_method", None)
            if not hasattr(method, "process_weights_after_loading") or not hasattr(weight, "data_ptr"):
                continue
            if weight.is_meta or weight.numel() == 0:  # not loaded, or its values moved into a packed copy
                continue
            groups.setdefault(weight.data_ptr(), []).append((name, module))
        redone = []
        for members in groups.values():
            if len(members) > 1:
                for name, module in members:
                    module.quant_method.process_weights_after_loading(module)
                    redone.append(name)
        return redone
