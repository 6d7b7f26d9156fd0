# Two entry points for a newcomer: `make demo` and `make test`.
# Both create .venv when it is missing and install herd with what it needs.
# TORCH pins the CPU wheel cached on the project's machines; override it elsewhere,
# e.g. `make test TORCH='torch>=2.8'`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.herd-installed

.PHONY: demo test test-tour install clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[demo,test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m herd demo

# The whole suite except the README tour (which runs every README command on a quick demo, 10+
# minutes on 2 cores, and would put `make test` over its 15-minute budget): `make test-tour`.
test: $(STAMP)
	$(PY) -m pytest -q -m "not tour"

test-tour: $(STAMP)
	$(PY) -m pytest -q -m tour tests/integration/test_readme_tour.py

clean:
	rm -rf $(VENV) build *.egg-info
