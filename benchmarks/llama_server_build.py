"""Build llama.cpp's `llama-server` once from the llama-cpp-python sdist on PyPI and cache it.

These machines reach package registries and nothing else, so llama.cpp's own releases and git
are out of reach; the llama-cpp-python sdist vendors the full llama.cpp tree (vendor/llama.cpp)
and is the one source that is. The binary is what llama.cpp's users run: a process of its own
with an HTTP server, started by the benchmark like any other server.

The build is CPU-only, Release, -march=native (llama.cpp's default GGML_NATIVE), without the web
UI (its prebuilt assets come from the Hugging Face hub, unreachable here) and without OpenSSL
(loopback HTTP only). The result is cached at
`herd_cache_dir()/llama-server/<version>/llama-server`, statically linked against llama.cpp's
own libraries so the folder moves as one piece; it is renamed into place only after the build
finished, so a cache entry is complete or absent.

    python benchmarks/llama_server_build.py            # build (or find) and print the path
    python benchmarks/llama_server_build.py --version 0.3.36
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from herd.io import atomic_dir, herd_cache_dir

# The llama-cpp-python release whose vendored llama.cpp is built; the same as the bindings the
# other benchmarks use, so both routes run the same kernels.
DEFAULT_VERSION = "0.3.36"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=ON",
]


def cached_binary(version: str = DEFAULT_VERSION) -> Path:
    return herd_cache_dir() / "llama-server" / version / "llama-server"


def _log(msg: str) -> None:
    print(f"[llama-server build] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, cwd: Path, log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` failed (exit {proc.returncode}); log {log}:\n{tail}")


def build_llama_server(version: str = DEFAULT_VERSION, *, jobs: int | None = None) -> Path:
    """Path of a llama-server binary built from llama-cpp-python==`version`, building it on first use."""
    dst = cached_binary(version)
    if dst.is_file():
        _make_executable(dst)
        return dst
    cmake = shutil.which("cmake")
    if cmake is None:
        raise FileNotFoundError("building llama-server needs cmake; install it (`pip install cmake` into this "
                                "environment, or your system's package) or pass --llama-server PATH")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise FileNotFoundError("building llama-server needs a C++ compiler (g++ or clang++); install one or pass "
                                "--llama-server PATH")
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        work = Path(tmp)
        log = work / "build.log"
        _log(f"downloading the llama-cpp-python {version} sdist from PyPI (~75 MB)")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
             "--disable-pip-version-check", "-d", str(work), f"llama-cpp-python=={version}"],
            capture_output=True, text=True)
        sdists = list(work.glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or len(sdists) != 1:
            raise FileNotFoundError(f"could not download the llama-cpp-python {version} sdist: "
                                    f"{proc.stderr.strip()[-400:]}; pass --llama-server PATH to a built binary")
        _log("unpacking vendor/llama.cpp")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(work, filter="data")
        src = work / sdists[0].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
        if not (src / "tools" / "server").is_dir():
            raise FileNotFoundError(f"{sdists[0].name} has no vendor/llama.cpp/tools/server; this version's layout "
                                    "differs, pick another with --llama-server-version")
        build = work / "build"
        t0 = time.monotonic()
        _log(f"configuring with cmake (log: {log})")
        _run([cmake, "-S", str(src), "-B", str(build), *CMAKE_FLAGS], cwd=work, log=log)
        _log(f"compiling llama-server with {jobs} jobs (10-30 minutes on 2 cores)")
        _run([cmake, "--build", str(build), "--target", "llama-server", "-j", str(jobs)], cwd=work, log=log)
        binary = build / "bin" / "llama-server"
        if not binary.is_file():
            raise FileNotFoundError(f"the build finished but {binary} is missing; see {log}")
        _log(f"built in {time.monotonic() - t0:.0f} s")

        def write(folder: Path) -> None:
            shutil.copy2(binary, folder / "llama-server")
            shutil.copy2(log, folder / "build.log")

        atomic_dir(dst.parent, write, overwrite=True)
    _make_executable(dst)
    return dst


def _make_executable(path: Path) -> None:
    # atomic_dir publishes files with a plain file's mode (0666 less the umask): give back the x bits.
    mode = path.stat().st_mode
    if mode & 0o111 != 0o111:
        path.chmod(mode | 0o111)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python release whose llama.cpp to build")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    args = p.parse_args()
    print(build_llama_server(args.version, jobs=args.jobs))


if __name__ == "__main__":
    main()
