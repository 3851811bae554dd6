# Source this on a GPU machine (no network) from the checkout root:
#   source scripts/gpu_setup.sh
# Installs the brought-along wheels in .whl/ (prepared here by scripts/fetch_gpu_wheels.sh)
# into /tmp/site and installs ftcore and its in-repo plugins without dependencies (the test assets
# ship inside the package, so nothing else needs copying).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . $(for p in plugins/*/; do [ -f "$p/pyproject.toml" ] && echo "-e $p"; done)
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
set +e
