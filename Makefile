# Two entry points: `make demo` (whole chain on the embedded sample) and `make test`.
# Both create/refresh .venv. torch is pinned to the CPU build that lies on this machine's disk;
# the project itself accepts torch>=2.5.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
CONFIG ?= configs/demo.yaml

.PHONY: venv demo test bench study clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline sample --config $(CONFIG)
	$(PY) -m pipeline build --config $(CONFIG)
	$(PY) -m pipeline shard --config $(CONFIG)
	$(PY) -m pipeline inspect --config $(CONFIG)
	$(PY) -m train fit --config $(CONFIG) --resume
	$(PY) -m train evaluate --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.loader
	$(PY) -m benchmarks.attention
	$(PY) -m benchmarks.train

# The skill study (configs/study.yaml): 4 variants x 3 seeds, ~2 hours on 2 cores; run it in the
# background. Its summary is copied to benchmarks/results/ablation.{md,json}, which the README quotes.
STUDY := configs/study.yaml
study: $(STAMP)
	$(PY) -m pipeline sample --config $(STUDY)
	$(PY) -m pipeline build --config $(STUDY)
	$(PY) -m pipeline shard --config $(STUDY)
	$(PY) -m train ablate --config $(STUDY) --no-progress
	cp runs/study-ablate/ablation.md runs/study-ablate/ablation.json benchmarks/results/

clean:
	rm -rf $(VENV) data/demo runs/demo
