#!/usr/bin/env bash
# llama.cpp for the test suite, in VENV: llama-cpp-python's Python bindings over a libllama built from the
# llama.cpp source that llama-cpp-python ships (so the two match), and that source's own converter
# (VENV/llama.cpp/src/convert_hf_to_gguf.py, which tests/test_llama_cpp.py finds there).
#
# Why not `pip install llama-cpp-python`: it builds every library llama.cpp has, about an hour on 2 cores;
# libllama alone takes a few minutes. The prebuilt llama-cpp-py-sync wheel needs glibc 2.38 (Debian 12 has
# 2.36). Usage: scripts/build_llama_cpp.sh VENV
set -euo pipefail
venv="$(cd "$1" && pwd)"
version=0.3.36
work="$venv/llama.cpp"
rm -rf "$work" && mkdir -p "$work"
"$venv/bin/python" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
ln -s "llama_cpp_python-$version/vendor/llama.cpp" "$work/src"
# $ORIGIN: libllama finds its ggml libraries beside it wherever they are copied.
cmake -S "$work/src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$work/build" --target llama -j "$(nproc)" >/dev/null
CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$venv/bin/python" -m pip install --quiet "$work/llama_cpp_python-$version.tar.gz"
lib="$("$venv/bin/python" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib")')"
mkdir -p "$lib"
cp -P "$work"/build/bin/lib*.so* "$lib"/
"$venv/bin/python" -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__, 'from', '$lib')"
