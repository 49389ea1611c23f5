# make demo: install into .venv, fetch the default model, compress it to a budget and uniformly,
#            evaluate both side by side, write a report with a plot.
# make test: install into .venv and run the fast test suite.
# make demo-run SW="..." runs the demo's commands with another sizewise (e.g. an existing venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SW ?= $(VENV)/bin/sizewise
DEMO := out/demo
# The demo allocates RTN formats at exactly uniform RTN w4g64's size (4.3125 bits/weight) and compares the
# two: same bytes, per-layer choice. A small calibration set (for the sensitivity profile only) and RTN
# candidates keep it to minutes on 2 cores; GPTQ candidates (the default with --calib) solve 24 grids
# per linear with 128 samples (SmolLM2: about 7 CPU-minutes on an AMX Xeon, far longer on AVX2).
DEMO_CALIB := --calib enwiki-sample --calib-samples 32 --calib-len 256 --fisher-samples 4 --measure-samples 4

.PHONY: install test test-slow demo demo-run bench clean

# torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,deploy]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(MAKE) --no-print-directory demo-run

demo-run:
	$(SW) fetch smollm2-135m
	$(SW) compress smollm2-135m --budget 4.3125bpw --method rtn $(DEMO_CALIB) --force -o $(DEMO)/budget-4.3125bpw
	$(SW) compress smollm2-135m --method rtn --bits 4 --group-size 64 --force -o $(DEMO)/uniform-rtn-w4g64
	$(SW) compare smollm2-135m $(DEMO)/uniform-rtn-w4g64 $(DEMO)/budget-4.3125bpw --text wikitext2-test --windows 16 \
	    --force -o $(DEMO)/report
	$(SW) info $(DEMO)/budget-4.3125bpw > $(DEMO)/budget-4.3125bpw.info.txt && tail -2 $(DEMO)/budget-4.3125bpw.info.txt
	@echo "report: $(DEMO)/report/report.md"

clean:
	rm -rf $(VENV) out .pytest_cache
