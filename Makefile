# One entry point for set-up, running and checking. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The optional C accelerator (service/pathwatch/receiver/_wirescan.c) is built by the install:
# a change to it, or to setup.py, reinstalls. Without a C compiler the install goes on without it.
BUILD_INPUTS := pyproject.toml setup.py service/pathwatch/receiver/_wirescan.c
STAMP := $(VENV)/.installed-$(shell cat $(BUILD_INPUTS) | cksum | cut -d' ' -f1)
# Where a C compiler exists the accelerator must have been built: its tests fail otherwise.
REQUIRE_ACCELERATOR := $(shell command -v cc >/dev/null 2>&1 && echo 1)

.PHONY: run test demo lint typecheck unit bench soak clean docs proto

$(STAMP): $(BUILD_INPUTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pathwatch needs Python 3.11 or newer (found " + sys.version.split()[0] + ")")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	$(BIN)/pathwatch serve $(if $(CONFIG),--config $(CONFIG),)

demo: $(STAMP)
	$(BIN)/pathwatch demo

lint: $(STAMP)
	$(BIN)/ruff check setup.py service tests $(wildcard bench) $(wildcard soak)
	$(BIN)/ruff format --check setup.py service tests $(wildcard bench) $(wildcard soak)

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite runs on both paths of the receiver: with the C accelerator (when built), then on
# pure Python, as on a machine without a compiler.
unit: $(STAMP)
	TEST_REQUIRE_ACCELERATOR=$(REQUIRE_ACCELERATOR) $(BIN)/pytest -q
	PATHWATCH_PURE_PYTHON=1 $(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

# The soak and crash harness (not part of `make test`): 10 minutes by default;
# e.g. `make soak SOAK_ARGS="--duration 60 --seed 42"`; `python -m soak --help` lists the rest.
soak: $(STAMP)
	$(BIN)/python -m soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

docs: $(STAMP)
	$(BIN)/python -m pathwatch.telemetry.docs > docs/metrics.md

# Regenerates the reduced OTLP view's descriptor set (needs grpcio-tools, installed on demand).
proto: $(STAMP)
	$(BIN)/python -m pip install --quiet 'grpcio-tools>=1.66,<2'
	$(BIN)/python -m grpc_tools.protoc -Iproto \
	  --descriptor_set_out=service/pathwatch/receiver/otlpview.binpb \
	  proto/pathwatch/otlpview/v1/otlpview.proto
