# The two commands of the README. Both create .venv and install the project into it on first use
# (again whenever pyproject.toml changes).
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test clean

# The demo: the notebooks of profiles/demo.yaml executed with papermill into build/executed/,
# then the book in _build/html (open _build/html/index.html).
demo: $(STAMP)
	$(VENV)/bin/spinemets run --profile demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf build _build
