# Two entry points for a newcomer: `make demo` and `make test`.
# Both create .venv when it is missing and install herd with what it needs.
# TORCH pins the CPU wheel cached on the project's machines; override it elsewhere,
# e.g. `make test TORCH='torch>=2.8'`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.herd-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[demo,test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m herd demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
