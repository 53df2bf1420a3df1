#!/usr/bin/env bash
# Why requirements.txt keeps llama-cpp-python at 0.3.16: this builds a newer
# release twice and decodes 128 tokens of the bundled model with each build
# and with the project's own 0.3.16, printing llama.cpp's system info and the
# decode rate (or how the process died).
#
#   bash bench/repro_llama_cpp_0_3_36.sh            # VERSION=0.3.36 by default
#
# Seen on development machines whose CPUs have AMX (2-core x86-64):
#   * "native": built as the Makefile builds 0.3.16 (-DGGML_OPENMP=OFF, so
#     GGML_NATIVE=ON), it crashed inside ggml's AMX int8 code (illegal
#     instruction or general protection fault in libggml-cpu), with
#     AMX_INT8 = 1 in the system info;
#   * "portable": GGML_NATIVE=OFF with explicit AVX-512 flags and no AMX ran,
#     but decoded at 82-88 tokens/s against 173 for 0.3.16.
# On a machine without AMX (AMD EPYC with AVX-512) both builds ran, at
# 0.3.16's speed: 129 (native) and 128 (portable) against 116 tokens/s.
# Each build takes a few minutes; the wheels and venvs stay under
# ~/.cache/chatsite/repro-<version> for a second run.
set -euo pipefail

VERSION=${VERSION:-0.3.36}
root="$(cd "$(dirname "$0")/.." && pwd)"
project_python="$root/.venv/bin/python"
work="$HOME/.cache/chatsite/repro-$VERSION"
mkdir -p "$work"

model=$("$project_python" -c '
import sys; sys.path.insert(0, "'"$root"'")
from inference.specs import BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE, ModelSpec
print(ModelSpec.from_table(BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE).source.resolve())')

# Prints the system info and the decode rate of 128 tokens, greedy, 2 threads.
probe='
import sys, time
import llama_cpp
from llama_cpp import Llama
print("llama-cpp-python", llama_cpp.__version__)
print(llama_cpp.llama_print_system_info().decode())
llama = Llama(sys.argv[1], n_ctx=2048, n_threads=2, verbose=False)
messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
llama.create_chat_completion(messages=messages, max_tokens=8, temperature=0)
times = []
for chunk in llama.create_chat_completion(messages=messages, max_tokens=128, temperature=0, stream=True):
    if chunk["choices"][0]["delta"].get("content"):
        times.append(time.monotonic())
rate = (len(times) - 1) / (times[-1] - times[0])
print(f"decode: {rate:.0f} tokens/s ({len(times)} tokens)")
'

run_probe() {
    local label=$1 python=$2
    echo "== $label"
    set +e
    "$python" -c "$probe" "$model"
    local status=$?
    set -e
    if [ $status -ne 0 ]; then
        if [ $status -gt 128 ]; then
            echo "$label: crashed with signal $((status - 128)) ($(kill -l $((status - 128))))"
        else
            echo "$label: failed with status $status"
        fi
    fi
}

build_variant() {
    local variant=$1 cmake_args=$2
    local venv="$work/venv-$variant"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --upgrade pip
    fi
    if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
        echo "Building llama-cpp-python $VERSION ($variant): $cmake_args"
        CMAKE_ARGS="$cmake_args" "$venv/bin/pip" wheel --quiet --no-cache-dir --no-deps \
            --wheel-dir "$work/wheels-$variant" "llama-cpp-python==$VERSION"
        "$venv/bin/pip" install --quiet "$work/wheels-$variant"/llama_cpp_python-*.whl
    fi
}

build_variant native "-DGGML_OPENMP=OFF"
build_variant portable "-DGGML_OPENMP=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
-DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

run_probe "0.3.16 (the project's build)" "$project_python"
run_probe "$VERSION native" "$work/venv-native/bin/python"
run_probe "$VERSION portable, no AMX" "$work/venv-portable/bin/python"
