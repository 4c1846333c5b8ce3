# The two commands of the README. Both create .venv and install the project into it on first use
# (again whenever pyproject.toml changes).
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test clean

demo: $(STAMP)
	$(VENV)/bin/spinemets synth --out build/demo/cohort --cases 24 --seed 0 --preset demo
	$(VENV)/bin/spinemets scan build/demo/cohort --out build/demo/manifest.csv --holdout 4
	$(VENV)/bin/spinemets import --manifest build/demo/manifest.csv --stage vertebrae --out build/demo/nnUNet_raw
	$(VENV)/bin/spinemets import --manifest build/demo/manifest.csv --stage metastases --out build/demo/nnUNet_raw

test: $(STAMP)
	$(VENV)/bin/python -m pytest

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf build _build
