# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean constraints

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	# torch is pinned exactly so pip takes the CPU wheel and never a CUDA build
	$(BIN)/python -m pip install "torch==2.13.0"
	# every other package at the version the suite last passed with (constraints.txt)
	$(BIN)/python -m pip install -c constraints.txt -e ".[test]"
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

# After a deliberate upgrade (pip install -U ... in .venv) and a green `make test`.
constraints: install
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
