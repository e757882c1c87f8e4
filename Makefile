# Two commands: `make demo` runs the main job, `make test` runs the whole suite.
# The demo trains a small Mixtral-like MoE on 8 CPU ranks (or GPUs) under two folded layouts, from the
# same initial weights on the same batches of the Python standard library's source, and compares.
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
	$(VENV)/bin/megatron-fold train --model mixtral-like --ranks 8 --compare-layouts tp2,ep4,etp1 cp2,pp2,ep4 \
		--capacity-factor 1.0 --drop-policy position --drop-scope sequence --steps 200 --eval-interval 50 \
		--out demo-output

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
