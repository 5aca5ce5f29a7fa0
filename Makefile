# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	# torch is pinned exactly so pip takes the CPU wheel and never a CUDA build
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/sl-pipeline demo

test: install
	$(BIN)/python -m pytest -q -n 3 --dist loadgroup --durations=25

lint: install
	$(BIN)/ruff check sl_pipeline privacy workers tests bench
	$(BIN)/ruff format --check sl_pipeline privacy workers tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
