"""The bundle's launchers and README (text only): what `bitsmith package` writes next to the artifact."""

from __future__ import annotations

from typing import Any

# Every launcher: the bundle's own runtime first on the path (no bitsmith or tvm from site-packages), TVM's runtime
# library only, and the bundle's .venv when ./install made one. $PYTHON may be a command with arguments, e.g.
# "qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11" (left unquoted on purpose).
_PREAMBLE = """#!/bin/sh
set -e
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "$PYTHON" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$here/runtime${BUNDLE_SITE:+:$BUNDLE_SITE}"
export TVM_USE_RUNTIME_LIB=1
"""


def launchers(model_name: str) -> dict[str, str]:
    """name -> the script; `serve` reports the artifact's original directory name as its model id."""
    quoted = "'" + model_name.replace("'", "'\\''") + "'"
    return {"run": _PREAMBLE + '# ./run "Once upon a time" [--max-tokens N] [--json] [--chat] [--temperature T]\n'
                               'exec $PYTHON -m bitsmith.runtime run "$here/artifact" "$@"\n',
            "serve": _PREAMBLE + "# ./serve [--host 0.0.0.0] [--port 8000] [--model-name NAME]: an OpenAI-compatible API\n"
                                 f'exec $PYTHON -m bitsmith.runtime serve "$here/artifact" --model-name {quoted} "$@"\n',
            "install": INSTALL}


INSTALL = """#!/bin/sh
# ./install: a virtual environment in .venv with requirements.txt, from wheels/ when the bundle has them (no network).
set -e
here=$(cd "$(dirname "$0")" && pwd)
${PYTHON:-python3} -m venv "$here/.venv"
if [ -d "$here/wheels" ]; then
  "$here/.venv/bin/pip" install --no-index --find-links "$here/wheels" --no-deps -r "$here/requirements.txt"
else
  "$here/.venv/bin/pip" install --no-deps -r "$here/requirements.txt"
fi
"""


def _mib(n: int | None) -> str:
    return "(measured after writing)" if n is None else f"{n / 2**20:.1f} MiB"


def readme_text(info: dict[str, Any]) -> str:
    """The bundle's README: layout, how to install and run, and the sizes measured when it was written."""
    wheels = info["wheels"]
    rows = "\n".join(f"| {name} | {_mib(s['wheel']) if s['wheel'] is not None else '-'} | {_mib(s['unpacked'])} |"
                     for name, s in wheels.items())
    fit = "".join(f"\n    {line}" for line in info.get("device_fit") or ())
    fit = f"\nFit check (`bitsmith inspect artifact --device`):\n```{fit}\n```\n" if fit else ""
    offline = "yes: wheels/ holds every requirement" if info["offline"] else "no: ./install fetches requirements.txt from PyPI"
    return f"""# bitsmith bundle ({info['target']}, Python {info['python']})

A compiled model and the runtime that runs it, without the compiler, torch or TVM's compiler library.

## Layout
```
artifact/          the artifact: manifest.json, weights.safetensors, kernels/<target>.so, tokenizer files
runtime/bitsmith/  bitsmith/__init__.py, errors.py and runtime/ (only what the runtime imports)
runtime/tvm/       TVM {info['tvm']}'s runtime alone: the Python modules `import tvm` loads with
                   TVM_USE_RUNTIME_LIB=1 and lib/libtvm_runtime.so (no libtvm_compiler.so)
requirements.txt   pinned, the whole closure (install with --no-deps)
wheels/            the target's wheels of requirements.txt (bundles made with --offline)
install            python3 -m venv .venv and the requirements (offline from wheels/ when present)
run, serve         launchers: python -m bitsmith.runtime run|serve artifact/ with PYTHONPATH=runtime/
bundle.json        what this README says, as data
```
Offline: {offline}. Kernels: {info.get('kernels', info['target'])}.
{fit}
## Use
```
./install                                  # once: .venv with requirements.txt
./run "Once upon a time" --max-tokens 32   # greedy unless --temperature; --json prints the token ids
./serve --host 0.0.0.0 --port 8000         # OpenAI-compatible: /v1/completions, /v1/chat/completions
```
Constrained decoding (`response_format`, `tools`, `--json-schema`, `--regex`) needs llguidance, which is not in
requirements.txt: the runtime imports it only when a request asks for a constraint (without it such a request is
refused with `pip install llguidance`; everything else runs). Add it with `.venv/bin/pip install llguidance`.
`PYTHON=...` picks the interpreter (it may be a command, e.g. `qemu-aarch64-static -L SYSROOT
SYSROOT/usr/bin/python3.11`); `BUNDLE_SITE=DIR` adds a directory where the requirements are unpacked instead of
a venv. The device needs Python {info['python']} (the pins are for it). Without venv support (Debian's python3 lacks
ensurepip): `mkdir site && for w in wheels/*.whl; do python3 -m zipfile -e "$w" site; done` (or `pip install
--no-deps --target site -r requirements.txt`), then `BUNDLE_SITE=$PWD/site ./run ...`.

## Sizes
| | bytes |
|---|---|
| bundle directory | {_mib(info['bundle_bytes'])} |
| bundle .tar.gz | {_mib(info['archive_bytes'])} |
| artifact | {_mib(info['artifact_bytes'])} |
| runtime/ (bitsmith runtime + TVM runtime) | {_mib(info['runtime_bytes'])} |
| installed on the device (bundle without wheels/ + requirements unpacked) | {_mib(info['installed_bytes'])} |
| instead: artifact + a full install (apache-tvm with its compiler + requirements, unpacked) | {_mib(info['naive_installed_bytes'])} |
| instead: artifact + every wheel of a full install (apache-tvm + requirements), as copied | {_mib(info.get('naive_copy_bytes')) if info.get('naive_copy_bytes') else '-'} |

| requirement | wheel | unpacked |
|---|---|---|
{rows}

The apache-tvm row is what a full install would take; the bundle carries only runtime/tvm instead.
"""
