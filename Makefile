# Two commands do all the set-up on a fresh machine (python3 is all they need):
#   make run    start the server with its scheduler on the embedded defaults (SQLite in ./data)
#   make test   lint, type-check and run the whole test suite
TOOLS := .tools
UV := $(TOOLS)/bin/uv
export AGNO_TELEMETRY := false
export UV_PROJECT_ENVIRONMENT := .venv

.PHONY: run test lint typecheck pytest bench sync clean

$(UV):
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv>=0.4"

sync: $(UV)
	$(UV) sync --frozen

run: sync
	$(UV) run --frozen ralph serve

lint: sync
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

typecheck: sync
	$(UV) run --frozen basedpyright

pytest: sync
	$(UV) run --frozen pytest

test: lint typecheck pytest

bench: sync
	for script in bench/*.py; do $(UV) run --frozen python $$script || exit 1; done

clean:
	rm -rf $(TOOLS) .venv .pytest_cache .ruff_cache
