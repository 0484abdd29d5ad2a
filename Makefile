# `make demo` and `make test` each set up .venv on first use: the demo installs the package alone,
# the tests add the test extra (pytest, and torch as the reference implementation).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO_DIR ?= runs/toy
POLICY_DIR ?= runs/toy-policy

.PHONY: demo demo-policy test format install clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# Trains the toy judge into $(DEMO_DIR). Run again, it continues that run from its latest checkpoint,
# or, once finished, prints its summary again; `rm -rf runs/toy` (or DEMO_DIR=runs/other) for a new one.
demo: $(STAMP)
	$(VENV)/bin/rrm-jax train --output-dir $(DEMO_DIR) --resume

# A tiny policy whose only reward is the toy judge of $(DEMO_DIR) (trained first when it has no checkpoint).
demo-policy: $(STAMP)
	test -d $(DEMO_DIR)/checkpoints || $(VENV)/bin/rrm-jax train --output-dir $(DEMO_DIR) --resume
	$(VENV)/bin/rrm-jax train --config rrm_jax/configs/toy_policy.yaml --output-dir $(POLICY_DIR) --resume reward.judge=$(DEMO_DIR)

# Lint and format checks first (seconds; ruff.toml), then the suite. `make format` fixes what ruff can.
test: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

format: $(TEST_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs
