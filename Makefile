# `make demo`: set up .venv if missing, train on the embedded digits data and print the results table.
# `make test`: set up .venv if missing, run the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup clean fewshot-extra

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, pinned, so pip takes the wheels from local disk
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m episodic.train head=r2d2 n_supp=1 n_query=1

test: setup
	$(BIN)/python -m pytest

# learn2learn 0.2.0 (mini/tiered-ImageNet loaders) does not build from its sdist on Python 3.11:
# regenerate its C sources with Cython 3, then install without build isolation.
fewshot-extra: setup
	bash scripts/install_learn2learn.sh $(BIN)

clean:
	rm -rf $(VENV) runs
