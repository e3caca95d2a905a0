# mlpay: every target uses the one virtual environment in .venv/, created on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat settings.ini setup.py | md5sum | cut -c1-12)
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYTHONHASHSEED := 0

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[train,dev,ops,spark,store]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install mlpay with its pinned dependencies

params: $(STAMP) ## compose conf/ into params.yaml (what `dvc exp run` does before each run)
	mlpay-params

data: $(STAMP) ## simulate the default transactions into data/ (tracked by data.dvc) unless present
	@test -e data/transactions.parquet || mlpay-simulate --params params.yaml
	@dvc commit --force --quiet data.dvc  # cache it; the simulator is deterministic, so data.dvc stays as committed
	@git diff --quiet -- data.dvc 2>/dev/null || echo "note: data/ differs from the committed data.dvc (ingested or re-simulated data): commit data.dvc"

pipeline: data ## run the DVC pipeline end to end: features, train, evaluate, export, benchmark
	dvc repro
	@dvc status

system-deps: ## install the system packages tests and benchmarks use (redis-server, wrk, prometheus with promtool, postgresql, chromium, Java 17 for Spark) when missing
	@missing=""; for p in redis-server wrk prometheus chromium; do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq$$missing >/dev/null; fi

serve: $(STAMP) ## serve artifacts/model/ on 127.0.0.1:8000 (needs MLPAY_API_KEY or MLPAY_API_KEY_FILE)
	MLPAY_STATE_DIR=$${MLPAY_STATE_DIR:-artifacts/serve-state} MLPAY_WARM_FROM=$${MLPAY_WARM_FROM:-data/transactions.parquet} \
	  MLPAY_DECISION_LOG_DIR=$${MLPAY_DECISION_LOG_DIR:-artifacts/serve-decisions} \
	  mlpay-serve --model artifacts/model --port $${PORT:-8000}

test: $(STAMP) system-deps check-nbs check-readme check-ruff check-docs ## run every test: the checks, the notebooks (nbdev_test) and tests/ (pytest)
	nbdev_test --n_workers 2
	pytest tests

check-nbs: $(STAMP) ## fail when notebooks are not clean or mlpay/ is out of sync with them
	@before=$$(find nbs mlpay -type f -not -path '*/__pycache__/*' | sort | xargs md5sum | md5sum); \
	nbdev_clean && nbdev_export; \
	after=$$(find nbs mlpay -type f -not -path '*/__pycache__/*' | sort | xargs md5sum | md5sum); \
	if [ "$$before" != "$$after" ]; then echo "notebooks were not clean or mlpay/ was out of sync: run nbdev_clean && nbdev_export and commit"; \
	git status --short nbs mlpay; exit 1; fi

check-readme: $(STAMP) ## fail when README.md is not what nbs/index.ipynb renders to (`make readme`)
	python tools/nbdocs.py readme --check

check-ruff: $(STAMP) ## ruff, configured in pyproject.toml: nbs/ (the source of mlpay/), tests/, bench/, containers/, tools/
	ruff check

check-docs: docs ## fail when the documentation site does not build (`make docs`)

readme: $(STAMP) ## write README.md from nbs/index.ipynb: edit the notebook, then run this
	python tools/nbdocs.py readme

# nbdev_docs needs Quarto, which PyPI's quarto-cli downloads from GitHub when it installs: where no quarto is on PATH,
# tools/nbdocs.py runs nbdev's doc processing (the step that fails on a notebook's content) and renders with nbconvert.
docs: $(STAMP) ## the documentation site in _docs/, a page per notebook: nbdev_docs with Quarto if installed, else nbconvert
	@if command -v quarto >/dev/null; then nbdev_docs && python tools/nbdocs.py readme; else python tools/nbdocs.py site; fi

lab: $(STAMP) ## JupyterLab on nbs/ with the project's kernel, "mlpay (.venv)", on 127.0.0.1:$PORT (default 8888)
	python -m ipykernel install --sys-prefix --name mlpay --display-name "mlpay (.venv)"
	jupyter lab --ServerApp.root_dir=nbs --ServerApp.ip=127.0.0.1 --ServerApp.port=$${PORT:-8888} --no-browser $(if $(filter 0,$(shell id -u)),--allow-root)

test-slow: $(STAMP) ## also run the #| slow notebook cells and slow tests (real-sized data, minutes)
	nbdev_test --n_workers 2 --flags slow
	pytest tests -m slow

# The serving benchmark's peers, each in a venv of its own (their pins conflict with mlpay's: bench/peers/NAME.txt says how),
# made anew when its requirements change; bench/serve.py runs them with .venv/peers/NAME/bin/.
PEERS := kserve bentoml
$(VENV)/peers/%/.installed: bench/peers/%.txt | $(STAMP)
	rm -rf $(VENV)/peers/$*
	$(BIN)/python -m venv $(VENV)/peers/$*
	$(VENV)/peers/$*/bin/python -m pip install --quiet -r $<
	touch $@

bench-peers: $(PEERS:%=$(VENV)/peers/%/.installed) ## the serving benchmark's peers (KServe, BentoML), each in .venv/peers/NAME from bench/peers/NAME.txt

bench: $(STAMP) system-deps bench-peers ## run the benchmarks and print their tables (bench/)
	python bench/simulate.py
	python bench/features.py
	python bench/spark.py
	python bench/online.py
	python bench/turn.py
	python bench/decisions.py
	python bench/serve.py
	python bench/monitoring.py
	python bench/journal.py
	python bench/resilience.py
	python bench/fuzz.py
	python bench/console.py
	python bench/mcp_tools.py
	python bench/agent.py

bench-gpu: $(STAMP) ## the GPU benchmark (bench/gpu.py: onnxruntime CUDA, fp16, bf16 DDP training); CPU half without a GPU
	python bench/gpu.py

# The engine: podman with runc (Debian's), unless MLPAY_ENGINE names another; debootstrap makes the images' base.
engine-deps: ## install podman, runc and debootstrap when missing (the container images' engine and base)
	@if [ -z "$$MLPAY_ENGINE" ] && ! { command -v podman && command -v runc && command -v debootstrap; } >/dev/null; then \
	  echo "installing podman runc debootstrap"; $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq podman runc debootstrap >/dev/null; fi

images: $(STAMP) engine-deps ## build the container images (serve, serve-gpu, train: containers/images.py) offline, with artifacts/model; print their sizes
	python containers/images.py
	python containers/images.py --sizes

test-images: $(STAMP) engine-deps ## build the images with the tests' tiny model and run them as Kubernetes would (tests/test_images.py); skips, saying why, with no engine
	pytest tests/test_images.py -m images

lock: $(STAMP) ## re-lock the serving images' dependencies (containers/*/requirements.lock) after changing a requirements.txt
	python containers/lock.py

audit: $(STAMP) ## pip-audit the serving images' locks against PyPI's advisories: fail on a known vulnerability not in containers/audit-accept.toml (needs PyPI's JSON API; CI elsewhere)
	python tools/audit.py
	pytest tests/test_audit.py -m network

lint: $(STAMP) check-ruff check-nbs check-readme ## ruff, then the nbdev checks (notebooks clean and exported, README.md current)

# DVC's default remote `storage` (.dvc/config: s3://mlpay/dvc) is overridden per machine in .dvc/config.local, which git ignores;
# credentials never go in either file: botocore reads AWS_* variables, AWS_SHARED_CREDENTIALS_FILE or the cloud's workload identity.
remote: $(STAMP) ## point DVC's remote at $MLPAY_DVC_REMOTE_URL (and $AWS_ENDPOINT_URL, for an S3-compatible store) in .dvc/config.local
	@test -n "$$MLPAY_DVC_REMOTE_URL" || { echo "error: set MLPAY_DVC_REMOTE_URL (for example s3://my-bucket/mlpay/dvc)" >&2; exit 2; }
	dvc remote modify --local storage url "$$MLPAY_DVC_REMOTE_URL"
	@if [ -n "$$AWS_ENDPOINT_URL" ]; then dvc remote modify --local storage endpointurl "$$AWS_ENDPOINT_URL"; \
	  else dvc remote modify --local --unset storage endpointurl; fi
	@dvc remote list

clean: ## remove generated outputs (keeps .venv and data/)
	rm -rf artifacts reports/*.png .pytest_cache _proc _docs

.PHONY: help install params data pipeline serve system-deps engine-deps images test-images test check-nbs check-readme check-ruff check-docs readme docs lab test-slow bench bench-peers bench-gpu lock audit lint remote clean
