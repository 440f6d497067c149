# Two commands on a fresh machine: `make app` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEIGHTS ?= weights/emoji-64

.PHONY: app test bench gpu-check venv clean

venv: $(STAMP)

# Re-install whenever requirements.txt changes. PyPI's Linux torch brings its CUDA libraries (about 6 GB in
# .venv, even on a CPU-only machine): say so up front rather than after a failed install.
$(STAMP): requirements.txt
	@free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); if [ "$$free" -lt 7 ]; then \
	  echo "warning: $$free GB free on this disk; .venv needs about 6 GB (PyTorch and its CUDA libraries)" >&2; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

app: $(STAMP)
	$(PY) app.py --weights $(WEIGHTS)

test: $(STAMP)
	$(PY) -m pytest -q

$(VENV)/.bench-installed: $(STAMP) bench/requirements.txt
	$(PY) -m pip install --quiet -r bench/requirements.txt
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench.run

# With CUDA: the tests marked cuda and sampling on the GPU, one JSON line per figure. Without: one line, exit 0.
gpu-check: $(VENV)/.bench-installed
	$(PY) -m bench.gpu_check

clean:
	rm -rf $(VENV) .pytest_cache
