# Two entry points for a newcomer: `make demo` and `make test`.
# Both create .venv when it is missing and install herd with what it needs.
# TORCH pins the CPU wheel cached on the project's machines; override it elsewhere,
# e.g. `make test TORCH='torch>=2.8'`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.herd-installed

.PHONY: demo test test-heavy test-tour install clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[demo,test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m herd demo

# The whole suite except what would put it over its 15-minute budget on 2 cores: the multi-minute
# multi-process groups (`make test-heavy`: 8- and 16-rank layouts, elastic restarts, the TP
# server) and the README tour (`make test-tour`: every README command on a quick demo). CI runs all three.
test: $(STAMP)
	$(PY) -m pytest -q -m "not tour and not heavy"

test-heavy: $(STAMP)
	$(PY) -m pytest -q -m heavy

test-tour: $(STAMP)
	$(PY) -m pytest -q -m tour tests/integration/test_readme_tour.py

clean:
	rm -rf $(VENV) build *.egg-info
