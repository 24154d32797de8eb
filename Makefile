# Two commands for a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= runs/demo
DEMO_STEPS ?= 250

.PHONY: demo test install bench clean

install: $(STAMP)

# torch first, pinned to the CPU wheel on disk, so pip never pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job: train the tiny DeepSeekMoE on Python's own standard library, then look
# at what its experts learned. Re-running continues (or re-exports) the same run.
demo: $(STAMP)
	$(VENV)/bin/dsmoe train --preset tiny --out $(DEMO_OUT) --resume --max-steps $(DEMO_STEPS)
	$(VENV)/bin/dsmoe analyze $(DEMO_OUT)/model --out $(DEMO_OUT)/analysis

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) runs .pytest_cache
