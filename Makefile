# `make demo`: set up .venv if missing, train on the embedded digits data and print the results table.
# `make test`: set up .venv if missing, run the test suite. `make check`: lint, format, types (what CI runs first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test check setup clean

$(BIN)/.installed: pyproject.toml scripts/install_learn2learn.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, pinned, so pip takes the wheels from local disk
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,qp]'
	# the `fewshot` extra (learn2learn) needs its C regenerated on Python 3.11: see the script
	bash scripts/install_learn2learn.sh $(BIN)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m episodic.train head=r2d2 n_supp=1 n_query=1

test: setup
	$(BIN)/python -m pytest

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs
