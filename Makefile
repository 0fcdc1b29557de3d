# Two commands for a fresh machine: `make demo` (set up, run the demo) and `make test`.
# Both create .venv and install the pinned CPU torch first: a torch range with no torch installed
# would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-heavy bench gpu-check clean constraints

# constraints.txt: the exact versions the tests pass with (regenerate with `make constraints`)
$(VENV)/.installed: setup.py Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -c constraints.txt -e ".[dev,kernels]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest tests -q -ra

# The tests marked heavy (minutes each: `reproduce --quick`, the 9B-width student); CI runs them
# after `make test`.
test-heavy: install
	ZREWARD_HEAVY=1 $(PY) -m pytest tests -q -ra -m heavy

bench: install
	$(PY) bench/bench_score_head.py

constraints: install
	{ sed -n 1,3p constraints.txt; $(PY) -m pip freeze | grep -v -E "^#|^-e|^torch==|^pyflakes=="; } > constraints.new
	mv constraints.new constraints.txt

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
