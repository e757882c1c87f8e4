# Two commands: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv on first use with a Python >= 3.12 found on the machine, and reuse it afterwards.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@# A .venv made with an older Python (megatron-core needs 3.12) is rebuilt, not reused.
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || \
		"$$(scripts/find_python.sh)" -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megatron-fold explain --world 128 --gpus-per-node 8 --tp 2 --pp 8 --ep 8 --etp 1 --num-experts 8

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
