#!/usr/bin/env bash
# Build llama.cpp's own server from the sources inside the pinned
# llama-cpp-python sdist, with the same CMake flags as the wheel, so that the
# benchmark compares the engine with llama-server on the very same llama.cpp.
#
#   LLAMA_VERSION=0.3.16 CMAKE_ARGS="-DGGML_OPENMP=OFF" PIP=.venv/bin/pip \
#       bash bench/build_llama_server.sh ~/.cache/chatsite/llama-server/0.3.16-cpu/llama-server
#
# Idempotent: an existing output binary is kept (delete it to rebuild). The
# work directory sits beside the output, so a second run reuses the download.
set -euo pipefail

output=${1:?usage: build_llama_server.sh OUTPUT_PATH}
: "${LLAMA_VERSION:?set LLAMA_VERSION (the llama-cpp-python version pinned in requirements.txt)}"
PIP=${PIP:-pip}
CMAKE_ARGS=${CMAKE_ARGS:-}

if [ -x "$output" ]; then
    echo "llama-server already built: $output"
    exit 0
fi

work="$(dirname "$output")/build"
mkdir -p "$work"
sdist=$(ls "$work"/llama_cpp_python-"$LLAMA_VERSION".tar.gz 2>/dev/null || true)
if [ -z "$sdist" ]; then
    echo "Downloading the llama-cpp-python $LLAMA_VERSION sdist"
    "$PIP" download --quiet --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==$LLAMA_VERSION"
    sdist="$work/llama_cpp_python-$LLAMA_VERSION.tar.gz"
fi
source_dir="$work/llama_cpp_python-$LLAMA_VERSION"
if [ ! -d "$source_dir/vendor/llama.cpp" ]; then
    tar -xzf "$sdist" -C "$work"
fi

echo "Building llama-server from $source_dir/vendor/llama.cpp with: $CMAKE_ARGS"
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags, split on purpose
cmake -S "$source_dir/vendor/llama.cpp" -B "$work/cmake" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DBUILD_SHARED_LIBS=OFF \
    $CMAKE_ARGS
cmake --build "$work/cmake" --target llama-server -j "$(nproc)"
mkdir -p "$(dirname "$output")"
cp "$work/cmake/bin/llama-server" "$output.tmp"
mv "$output.tmp" "$output"
echo "llama-server built: $output"
