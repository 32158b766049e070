# Everything a new machine needs: `make demo` runs meter's main job, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.meter-installed
SRC    := pyproject.toml setup.py $(wildcard ext/*.pyx ext/*.pxd)

# Debian packages the tests use (real servers and validators), installed when missing.
DEB_PACKAGES := prometheus systemd buildah debootstrap chromium

.PHONY: all install build system-deps test test-fast test-asan validate-deploy lint demo bench clean

all: install

system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): $(SRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,ops]'
	touch $(STAMP)

install: $(STAMP)

# Rebuild the extension in place after editing ext/ (pip's editable install already built it once).
build: $(STAMP)
	$(BIN)/python setup.py --quiet build_ext --inplace

test: install system-deps lint validate-deploy
	$(BIN)/python -m pytest -q -m "not deploy"
	$(MAKE) --no-print-directory test-asan

# Deploy artefacts (systemd, image, Kubernetes, Helm, PrometheusRule) and the release build,
# each checked by its real validator, failing on any warning (tests/test_deploy*.py,
# tests/test_release.py). checkov lives in a venv of its own: it pins an older packaging.
CHECKOV := $(VENV)/checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/python -m pip install --quiet 'checkov==3.3.30'

validate-deploy: install system-deps $(CHECKOV)
	$(BIN)/python -m pytest -q -m deploy

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration and not deploy"

# The parser tests against a debug build (bounds checks, C asserts) under AddressSanitizer/UBSan,
# built in a scratch copy of the tree so the regular extension stays untouched.
ASAN_TREE := build/asan-tree
test-asan: install
	rm -rf $(ASAN_TREE) && mkdir -p $(ASAN_TREE)
	git ls-files -co --exclude-standard | grep -v '^build/' | tar -cf - -T - | tar -xf - -C $(ASAN_TREE)
	cd $(ASAN_TREE) && METER_ASAN=1 ../../$(BIN)/python setup.py --quiet build_ext --inplace
	cd $(ASAN_TREE) && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		PYTHONPATH=. METER_EXPECT_DEBUG_BUILD=1 ../../$(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/test_parser.py tests/test_parser_fuzz.py tests/test_verify.py tests/test_dedup.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: install
	$(BIN)/meter demo --seconds 30

bench: install
	$(BIN)/python benchmarks/bench_parse.py

clean:
	rm -rf build dist *.egg-info meter/*.so ext/*.c $(VENV)
