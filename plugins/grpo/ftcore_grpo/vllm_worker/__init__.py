"""Code that runs inside the vLLM server (see ``ftcore_vllm_worker.py``); ftcore never imports it."""
