# Two commands for a fresh machine: `make demo` (set up, run the demo) and `make test`.
# Both create .venv and install the pinned CPU torch first: a torch range with no torch installed
# would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# The package index can drop a large download midway (triton's 286 MB wheel once failed CI after
# six resumes): pip resumes more, and each install step is tried three times before it fails.
PIP     = $(PY) -m pip install --retries 10 --timeout 60 --resume-retries 30
RETRY   = for try in 1 2 3; do
DONE    = && break; [ $$try = 3 ] && exit 1; echo "pip failed (try $$try), retrying in 20 s"; sleep 20; done

.PHONY: install demo test test-heavy bench gpu-check clean constraints

# constraints.txt: the exact versions the tests pass with (regenerate with `make constraints`)
$(VENV)/.installed: setup.py Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(RETRY) $(PY) -m pip install --retries 10 --timeout 60 --upgrade pip $(DONE)
	$(RETRY) $(PIP) "$(TORCH)" $(DONE)
	$(RETRY) $(PIP) -c constraints.txt -e ".[dev,kernels]" $(DONE)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest tests -q -ra -o tmp_path_retention_policy=failed

# The tests marked heavy (minutes each: `reproduce --quick`, the 9B-width student); CI runs them
# after `make test`.
test-heavy: install
	ZREWARD_HEAVY=1 $(PY) -m pytest tests -q -ra -o tmp_path_retention_policy=failed -m heavy

bench: install
	$(PY) bench/bench_score_head.py

constraints: install
	{ sed -n 1,3p constraints.txt; $(PY) -m pip freeze | grep -v -E "^#|^-e|^torch==|^pyflakes=="; } > constraints.new
	mv constraints.new constraints.txt

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
