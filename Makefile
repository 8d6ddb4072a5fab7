# st-scale: set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
EXTRAS ?= [dev]
# Editable for development; the docker/ images install a regular (non-editable) copy: EDITABLE=
EDITABLE ?= -e
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
# ffcv compiles against OpenCV and libjpeg-turbo found through pkg-config.
SYSTEM_PACKAGES := pkg-config g++ libopencv-dev libturbojpeg0-dev

.PHONY: help install system-deps fashion-mnist browser postgres demo lint format test test-fast fuzz bench docs study mutate clean

help:
	@echo "make install    create $(VENV) and install st-scale with its dev extras (system packages too, when root);"
	@echo "                PYTHON=python3.12 VENV=/opt/venv EXTRAS= EDITABLE= is how the docker/ images install it"
	@echo "make demo       the embedded default: CT vs ST on the bundled digits set"
	@echo "make lint       ruff format --check and ruff check (CI runs it before the tests)"
	@echo "make format     ruff format and the safe ruff fixes"
	@echo "make test       the whole test suite: the tests without Ray in 2 processes, then those with Ray one by one"
	@echo "                (SUITE_TIME_ARGS='--save benchmarks/results/suite' keeps its timing table)"
	@echo "make test-fast  unit tests only (no slow marker), in 2 processes"
	@echo "make fuzz       generated bad input, 1,000 examples of each of 5 kinds drawn afresh (FUZZ_EXAMPLES=N); minutes"
	@echo "make bench      the CPU benchmarks of BENCHMARKS.md"
	@echo "make docs       the figure tables of README.md and BENCHMARKS.md, from the committed raw files"
	@echo "make fashion-mnist  Debian's dataset-fashion-mnist package (real benchmark data, RESULTS.md)"
	@echo "make browser    Debian's chromium and chromium-driver (the MLflow UI test drives a headless browser)"
	@echo "make postgres   Debian's PostgreSQL server (tests run MLflow's tracking store on it)"
	@echo "make study      the CPU study of RESULTS.md (its 18 runs take hours on 2 cores; running it again resumes it)"
	@echo "make mutate     mutation testing of the core modules with the fast tests (BENCHMARKS.md, Test strength; hours)"

FUZZ_EXAMPLES ?= 1000

install: $(STAMP)

system-deps:
	@if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
		echo "system packages: opencv4 and libturbojpeg found"; \
	elif [ "$$(id -u)" = "0" ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	else \
		echo "ffcv needs OpenCV and libjpeg-turbo headers. Run as root:"; \
		echo "  sudo apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES)"; \
		exit 1; \
	fi

fashion-mnist:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: found in /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = "0" ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST comes from a Debian package. Run as root:"; \
		echo "  sudo apt-get install -y --no-install-recommends dataset-fashion-mnist"; \
		exit 1; \
	fi

browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "browser: chromium and chromedriver found"; \
	elif [ "$$(id -u)" = "0" ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	else \
		echo "The MLflow UI test drives Debian's headless Chromium. Run as root:"; \
		echo "  sudo apt-get install -y --no-install-recommends chromium chromium-driver"; \
		exit 1; \
	fi

postgres:
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
		echo "postgres: PostgreSQL server found"; \
	elif [ "$$(id -u)" = "0" ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	else \
		echo "The tracking-store tests start Debian's PostgreSQL server. Run as root:"; \
		echo "  sudo apt-get install -y --no-install-recommends postgresql"; \
		exit 1; \
	fi

$(STAMP): pyproject.toml | system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel "setuptools<81"
	# torch first: deepspeed's and ffcv's setup.py import it / numpy at build time.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 "numpy>=2.0,<2.6" pkgconfig cython
	$(PY) -m pip install -q --no-build-isolation "deepspeed==0.19.*" ffcv==1.0.2
	$(PY) -m pip install -q $(EDITABLE) ".$(EXTRAS)"
	@touch $(STAMP)

demo: install
	$(BIN)/st-scale demo

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two phases: the tests that do not start Ray in two processes (pytest-xdist, one core each), then those
# that do (marker ray) one at a time, as each needs both cores. Both phases run; the target fails if
# either did. Then the 25 slowest tests and the wall time of each phase (benchmarks/suite_time.py).
SUITE := .suite
test: install fashion-mnist browser postgres
	@mkdir -p $(SUITE); rc=0; t0=$$(date +%s); \
	$(BIN)/pytest -q -n 2 --dist worksteal -m "not ray" --junitxml=$(SUITE)/without_ray.xml || rc=1; \
	t1=$$(date +%s); \
	$(BIN)/pytest -q -m ray --junitxml=$(SUITE)/ray.xml || rc=1; \
	t2=$$(date +%s); \
	$(PY) benchmarks/suite_time.py without_ray=$(SUITE)/without_ray.xml:$$((t1 - t0)) \
		ray=$(SUITE)/ray.xml:$$((t2 - t1)) $(SUITE_TIME_ARGS) || rc=1; \
	exit $$rc

test-fast: install
	$(BIN)/pytest -q -n 2 --dist worksteal -m "not slow"

# tests/test_fuzz.py with fresh draws: make test runs the same 25 examples of each kind every time.
fuzz: install
	ST_SCALE_FUZZ_PROFILE=fuzz ST_SCALE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_fuzz.py

bench: install
	$(PY) benchmarks/bench_subnet_eval.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_speed.py
	$(PY) benchmarks/bench_speed.py --model resnet50 --batch-size 64 --image-size 64

# The tables between <!-- docs.py: NAME --> markers; tests/test_docs.py fails when they are out of date.
docs: install
	$(PY) benchmarks/docs.py

study: install fashion-mnist
	$(BIN)/st-scale convert fashion-mnist --out ~/.cache/st_scale/fashion10k --train-subset 10000
	$(BIN)/st-scale sweep tune/fashion_table1.yaml --summary-json fashion_table1.json
	$(BIN)/st-scale report tune/fashion_table1.yaml --out benchmarks/results/fashion_table1

# Mutation testing ([tool.mutmut] in pyproject.toml names the modules); not part of CI. It resumes: the
# committed raw file's results stand for each mutated file unchanged since its commit, and only the
# mutants without a result are tested, every mutant of a changed file among them (on a new machine too:
# mutmut's own state, mutants/, is not committed). Without a raw file every mutant runs.
# MUTANTS="st_scale.methods.*" narrows it, and re-tests every mutant it names, those with a result too;
# `set -f` keeps such patterns from the shell's globbing.
MUTATION_RESULTS := benchmarks/results/mutation/results.json
mutate: install
	@start=$$(date +%s); names="$(MUTANTS)"; carry=""; \
	if [ -f $(MUTATION_RESULTS) ] && left=$$($(PY) benchmarks/mutation_score.py --not-run $(MUTATION_RESULTS)); then \
		carry="--carry-over $(MUTATION_RESULTS)"; \
		if [ -z "$$names" ]; then \
			[ -n "$$left" ] || { echo "every mutant has a result in $(MUTATION_RESULTS)"; exit 0; }; \
			names="$$left"; \
		fi; \
	fi; \
	set -f; OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 $$names; \
	$(PY) benchmarks/mutation_score.py --save-results $$carry --minutes $$(( ($$(date +%s) - start) / 60 ))

clean:
	rm -rf $(VENV) build *.egg-info mutants
