"""README.md's command tour, run in order, on what `herd demo --quick` leaves.

Each step of the tour (tests/integration/readme_tour.py says how the README's code blocks are
read) is one test case, in README order, sharing one scratch directory: `runs/demo` there is a
`herd demo --quick` run made once for the module, `configs/` is the repository's, and `herd` on
PATH runs this checkout. A step must exit 0; where the README says what a command writes, the
file must be there afterwards, and the SmolLM2 answers shown with temperature 0 must come back
(quick-demo numbers differ from the README's and are not compared). Servers run on a free port
instead of the README's 8000. A step after a failed one is skipped: the tour is a chain.

Slow (the demo and every command, 10+ minutes on 2 cores): marked `slow` and `tour`; `make test`
leaves it out to stay under 15 minutes, `make test-tour` runs it, and CI (.ci/run) runs both. While
editing the README, HERD_TOUR_DEMO=DIR copies a finished `herd demo --quick --out DIR` instead of
running the demo again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The tests folder is not a package (pytest's importlib mode): load the helper beside this file.
_spec = importlib.util.spec_from_file_location("herd_readme_tour", Path(__file__).with_name("readme_tour.py"))
readme_tour = sys.modules.setdefault("herd_readme_tour", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(readme_tour)

STEPS = readme_tour.load_tour(REPO / "README.md")
STEP_TIMEOUT_S = 900
SERVER_START_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Tour:
    cwd: Path
    env: dict
    setup: list[str] = field(default_factory=list)
    server: subprocess.Popen | None = None
    server_log: Path | None = None
    port: int = 0
    failed: str | None = None
    timings: list[tuple[str, float]] = field(default_factory=list)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
            self.server = None

    def localize(self, code: str) -> str:
        """The README's 127.0.0.1:8000 is this run's port."""
        return code.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}") if self.port else code


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    root = tmp_path_factory.mktemp("tour")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "herd"  # `herd` as the README types it, running this checkout with this Python
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m herd \"$@\"\n")
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cwd = root / "work"
    (cwd / "runs").mkdir(parents=True)
    (cwd / "configs").symlink_to(REPO / "configs")
    t0 = time.perf_counter()
    if os.environ.get("HERD_TOUR_DEMO"):  # iterating on the README: a finished quick demo, copied
        shutil.copytree(os.environ["HERD_TOUR_DEMO"], cwd / "runs" / "demo", symlinks=True)
    else:
        demo = subprocess.run([sys.executable, "-m", "herd", "demo", "--quick", "--out", "runs/demo"], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        assert demo.returncode == 0, f"herd demo --quick failed:\n{demo.stdout[-3000:]}\n{demo.stderr[-3000:]}"
    state = Tour(cwd=cwd, env=env)
    state.timings.append(("herd demo --quick", time.perf_counter() - t0))
    yield state
    state.stop_server()
    # Wall time depends on what else the machine runs; the commands' CPU time and the load say how much.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = sum(s for _, s in state.timings)
    print(f"\nREADME tour: {total:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} s CPU in its subprocesses (the demo too), "
          f"load average {os.getloadavg()[0]:.1f}; slowest: "
          + ", ".join(f"{n} {s:.0f} s" for n, s in sorted(state.timings, key=lambda x: -x[1])[:8]))


def _missing(name: str) -> bool:
    if name == "cuda":
        import torch

        return not torch.cuda.is_available()
    if shutil.which(name):
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _wait_for_health(tour: Tour, step) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if tour.server.poll() is not None:
            raise AssertionError(f"{step.name}: the server exited with {tour.server.returncode}:\n"
                                 f"{tour.server_log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{tour.port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{step.name}: no /health within {SERVER_START_S} s:\n{tour.server_log.read_text()[-3000:]}")


def _start_server(tour: Tour, step) -> None:
    tour.stop_server()
    tour.port = _free_port()
    tour.server_log = tour.cwd / f"server-{step.line}.log"
    code = "\n".join(tour.setup + [f"exec {step.code} --port {tour.port}"])
    with open(tour.server_log, "w") as log:
        tour.server = subprocess.Popen(["bash", "-c", code], cwd=tour.cwd, env=tour.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_health(tour, step)


def _argument(code: str, flag: str) -> str | None:
    words = shlex.split(code.replace("\\\n", " "), comments=True)
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def _check_outputs(step, result: subprocess.CompletedProcess, cwd: Path) -> None:
    """What the command says it writes exists, and greedy SmolLM2 answers are the README's."""
    code, out = step.code, result.stdout
    words = shlex.split(code.split("\n", 1)[0].rstrip("\\"), comments=True)
    paths = [_argument(code, f) for f in ("--out", "--heatmap", "--job.out_dir", "--output.dir")]
    if words[:2] in (["herd", "convert"], ["herd", "quantize"], ["herd", "export"]):
        paths.append(words[3])
    for p in filter(None, paths):
        assert (cwd / p).exists(), f"{step.name}: {p} was not written\n{out[-2000:]}"
    for written in re.findall(r"(?:written to|wrote \S+ checkpoint to|-> )(runs/\S+?)[,;)]?$", out, re.M):
        assert (cwd / written).exists(), f"{step.name}: says it wrote {written}, which is not there"
    if "$SMOL" in code and "--temperature 0" in code and "capital of France" in code:
        assert "Paris" in out, f"{step.name}: expected the README's answer (Paris), got:\n{out}"
    if step.stdin and "$SMOL" in code and "--temperature 0" in code:
        for shown in step.output:
            if shown.startswith("llama> "):
                assert shown[len("llama> "):] in out, f"{step.name}: expected {shown!r} in:\n{out}"
    if words[:1] == ["curl"]:
        body = json.loads(out)
        if "/completions" in code:  # an answer or an error, never neither (/tokenize and friends have their own keys)
            assert ("choices" in body) == ("error" not in body), body
        if step.output:
            shown = json.loads(step.output[0])
            assert set(shown) == set(body), f"{step.name}: README shows keys {set(shown)}, got {set(body)}"
            if "choices" in shown and shown["choices"][0].get("message"):
                assert body["choices"][0]["message"]["content"] == shown["choices"][0]["message"]["content"]


@pytest.mark.slow
@pytest.mark.tour
@pytest.mark.timeout(STEP_TIMEOUT_S + SERVER_START_S)
@pytest.mark.parametrize("step", STEPS, ids=[s.name for s in STEPS])
def test_readme_tour_step(step, tour):
    if tour.failed:
        pytest.skip(f"an earlier tour step failed ({tour.failed}); the tour is a chain")
    if step.skip:
        pytest.skip(f"{step.name}: {step.skip}")
    for name, reason in step.requires:
        if _missing(name):
            pytest.skip(f"{step.name}: needs {name} ({reason})")
    if step.kind == "setup":
        tour.setup.append(step.code)
        return
    if step.kind == "shell" and not step.block_serves:
        tour.stop_server()
    tour.failed = step.name  # cleared below when the step passes
    t0 = time.perf_counter()
    if step.background:
        _start_server(tour, step)
    else:
        if step.kind == "python":
            argv = [sys.executable, "-c", tour.localize(step.code)]
        else:
            argv = ["bash", "-c", "\n".join(tour.setup + [tour.localize(step.code)])]
        result = subprocess.run(argv, cwd=tour.cwd, env=tour.env, input=step.stdin or "", capture_output=True,
                                text=True, timeout=STEP_TIMEOUT_S)
        assert result.returncode == step.status, (f"{step.name} (README line {step.line}) exited "
                                                  f"{result.returncode}, not {step.status}:\n"
                                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        if step.kind == "shell" and step.status == 0:
            _check_outputs(step, result, tour.cwd)
    tour.timings.append((step.name, time.perf_counter() - t0))
    tour.failed = None
