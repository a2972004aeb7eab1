# Everything a newcomer needs: `make run` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LINT_DIRS := service tests tools examples $(wildcard bench)

.PHONY: setup run test lint bench soak container-test clean

$(STAMP): pyproject.toml setup.py $(wildcard service/datasync/*.c)  # the C extensions are built by the install
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(STAMP)  ## venv, Python packages, the Kafka broker's jars and Apicurio Registry (from Maven Central)
	$(BIN)/python tools/localkafka.py fetch > /dev/null
	$(BIN)/python tools/localregistry.py fetch > /dev/null

run: setup  ## the service on topics/ with demo data (starts a local broker if none is configured)
	$(BIN)/python tools/run_demo.py

lint: setup
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/mypy

test: lint  ## lint, type-check, and the whole suite against a real local broker
	$(BIN)/pytest

soak: setup  ## 1M keys, 200k live changes, a second resync; checks the view and the memory
	$(BIN)/pytest -m soak -s tests/test_soak.py

bench: setup  ## resync and live throughput against the raw-client limit (see README)
	$(BIN)/python bench/run.py

container-test: setup  ## build the image, run docker-compose.yml's stack and check it (installs and starts Docker)
	$(BIN)/python tools/container.py test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
