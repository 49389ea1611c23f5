# make demo: install into .venv, fetch the default model, compress, evaluate, write a report.
# make test: install into .venv and run the fast test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SW := $(VENV)/bin/sizewise
DEMO := out/demo

.PHONY: install test test-slow demo bench clean

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
	$(SW) fetch smollm2-135m
	$(SW) compress smollm2-135m --method gptq --bits 4 --group-size 64 --calib enwiki-sample \
	    --calib-samples 64 --calib-len 512 --force -o $(DEMO)/w4g64-gptq
	$(SW) compress smollm2-135m --method rtn --bits 4 --group-size 64 --force -o $(DEMO)/w4g64-rtn
	$(SW) compare smollm2-135m $(DEMO)/w4g64-rtn $(DEMO)/w4g64-gptq --text wikitext2-test --windows 16 \
	    -o $(DEMO)/report
	@echo "report: $(DEMO)/report/report.md"

clean:
	rm -rf $(VENV) out .pytest_cache
