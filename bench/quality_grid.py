"""The rows bench/quality.py measures: models, schemes, the method x rotation x scheme grid, and what each row needs."""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
SEQLEN = 256  # tokens per calibration sample
METHOD_ORDER = ("none", "rtn", "gptq", "awq", "hqq")
ROTATION_ORDER = ("none", "hadamard", "learned")
CLIPS = ("none", "mse")  # --clip choices; mse rows are added to the RTN/GPTQ rows of the grid
PEER_ROTATION_ORDER = ("none", "spinquant", "spinquant-learned", "quip")
# label -> (bits, group, sym); group -1 is one scale per output channel
SCHEMES = {
    "16-bit": (16, -1, True),  # no weight quantization (KV rows, and the exactness check of a rotation)
    "int8 per-channel": (8, -1, True),
    "int4 per-channel": (4, -1, True),
    "int4 g32": (4, 32, True),
    "int4 g64": (4, 64, True),
    "int4 g128": (4, 128, True),
    "int3 g32": (3, 32, True),
    "int2 g32": (2, 32, True),
    "int4 g32 asym (sanity)": (4, 32, False),
}
ISSUE_SCHEMES = ("int4 per-channel", "int4 g32", "int3 g32", "int2 g32")
ACT_SCHEMES = ("int4 per-channel", "int4 g32")  # the W4A8 rows
# the names bitsmith.tools.evaluate.evaluate_many may give its int8-activation emulation
ACT_PARAMETERS = ("activations", "act_dtype", "emulate_activations")


@dataclass(frozen=True)
class BenchModel:
    name: str
    source: str  # model path; "default" is the built-in SmolLM2 GGUF
    text: Path
    ctx: int
    calib_chars: tuple[int, int]  # slice of the same file used for calibration (disjoint from the scored part)
    calib_samples: int  # x SEQLEN tokens: several times the widest in_features, so GPTQ's Hessian is well posed


MODELS = {
    "tinystories": BenchModel("TinyStories-656K", str(DATA / "tinystories-656k"),
                              DATA / "tinystories-valid-subset" / "tinystories_valid_head.txt", 256,
                              (400_000, 794_375), 64),
    "smollm2": BenchModel("SmolLM2-135M", "default", DATA / "wikitext-2-raw-test" / "wiki.test.raw", 1024,
                          (700_000, 1_290_590), 32),
}


@dataclass(frozen=True)
class RowSpec:
    """One measured row: how its artifact is compiled (method, rotation, scheme, KV dtype) and scored."""

    method: str  # none (16-bit weights) | rtn | gptq | awq | hqq
    rotation: str  # none | hadamard | learned
    scheme: str  # a SCHEMES label
    bits: int
    group: int
    sym: bool
    kv: str = "auto"  # --kv-dtype: auto is float16 here
    activations: str = "float32"  # float32 | int8 (scored with the int8-activation emulation)
    clip: str = "none"  # --clip: none | mse (RTN and GPTQ only)

    @property
    def key(self) -> tuple:
        return (self.method, self.rotation, self.scheme, self.kv, self.activations, self.clip)

    @staticmethod
    def key_of(row: dict) -> tuple:
        return (row["method"], row.get("rotation", "none"), row["scheme"], row.get("kv", "auto"),
                row.get("activations", "float32"), row.get("clip", "none"))

    @staticmethod
    def order_of(row: dict, model_key: str) -> tuple:
        """Display order: plain rows by scheme, then KV rows, then int8-activation rows; method, rotation within."""
        section = 2 if row.get("activations", "float32") != "float32" else 1 if row.get("kv", "auto") != "auto" else 0
        schemes = list(SCHEMES)
        return (section, schemes.index(row["scheme"]) if row["scheme"] in schemes else len(schemes),
                row.get("kv", "auto"), _index(METHOD_ORDER, row["method"]), row.get("clip", "none") != "none",
                _index(ROTATION_ORDER, row.get("rotation", "none")))

    @property
    def artifact_name(self) -> str:
        # the activations are a scoring option: rows that differ only there share one artifact
        clip = f"-clip{self.clip}" if self.clip != "none" else ""
        return f"{self.method}-{self.rotation}-{self.bits}-{self.group}-{'s' if self.sym else 'a'}-kv{self.kv}{clip}"

    @property
    def label(self) -> str:
        extra = (f", kv {self.kv}" if self.kv != "auto" else "") + (
            f", act {self.activations}" if self.activations != "float32" else "") + (
            f", clip {self.clip}" if self.clip != "none" else "")
        return f"{self.method} {self.scheme} rot {self.rotation}{extra}"

    def json(self) -> dict:
        keys = ("method", "rotation", "scheme", "kv", "activations") + (("clip",) if self.clip != "none" else ())
        return {k: v for k, v in asdict(self).items() if k in keys}


def _index(order: tuple, value: str) -> int:
    return order.index(value) if value in order else len(order)


def row(method: str, rotation: str, scheme: str, kv: str = "auto", activations: str = "float32") -> RowSpec:
    if scheme not in SCHEMES:
        raise SystemExit(f"error: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    return RowSpec(method, rotation, scheme, *SCHEMES[scheme], kv=kv, activations=activations)


def _split(value: str, allowed: tuple, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise SystemExit(f"error: unknown {what} {', '.join(unknown)}; use a subset of {','.join(allowed)}")
    return items


def grid(model_key: str, args) -> list[RowSpec]:
    """The rows of one model: methods x rotations x schemes, then the KV rows and the int8-activation rows."""
    methods = _split(args.methods, METHOD_ORDER[1:], "method")
    rotations = _split(args.rotations, ROTATION_ORDER, "rotation")
    if args.schemes == "default":  # the issue's four under every rotation, the earlier table's others unrotated
        rotated = list(ISSUE_SCHEMES)
        unrotated = ["int8 per-channel", "int4 g64"] + (["int4 g128"] if model_key == "tinystories" else [])
    else:
        rotated, unrotated = [s.strip() for s in args.schemes.split(",") if s.strip()], []
    # measured in this order (the issue's rows first, so an interrupted run has those); the report sorts by scheme
    specs = [row(m, r, s) for s in rotated for m in methods for r in rotations]
    clips = [c for c in _split(getattr(args, "clips", "none"), CLIPS, "clip") if c != "none"]
    specs += [replace(spec, clip=c) for c in clips for spec in list(specs) if spec.method in ("rtn", "gptq")]
    if args.kv_rows:
        weights = [("none", "16-bit")] + ([("gptq", "int4 g32")] if "gptq" in methods else [])
        for method, scheme in weights:
            specs.append(row(method, "none", scheme, kv="int8"))
            specs += [row(method, r, scheme, kv="int4") for r in rotations]
        # a rotated model with 16-bit weights and KV: the rewrite is exact, so its KLD should be ~0
        specs += [row("none", r, "16-bit") for r in rotations if r != "none"]
    if args.act_rows:
        specs += [row(m, r, s, activations="int8") for s in ACT_SCHEMES for m in methods if m in ("rtn", "gptq")
                  for r in rotations]
    specs += [row(m, r, s) for s in unrotated for m in methods for r in rotations if r == "none"]
    if model_key == "smollm2" and "rtn" in methods and "none" in rotations and args.schemes == "default":
        specs.append(row("rtn", "none", "int4 g32 asym (sanity)"))  # reproduces the GGUF's Q4_1 grid exactly
    return specs


def peer_grid(model_key: str, args) -> list[tuple[str, str, int, int, bool]]:
    """(peer rotation, scheme label, bits, group, sym) of the peer rows, by scheme then rotation."""
    if not args.peer:
        return []
    rotations = _split(args.peer, PEER_ROTATION_ORDER, "peer rotation")
    schemes = [s.strip() for s in args.peer_schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise SystemExit(f"error: unknown peer scheme {', '.join(unknown)}; use one of {', '.join(SCHEMES)}")
    return [(r, s, *SCHEMES[s]) for s in schemes for r in rotations]


def compile_option_choices() -> dict[str, tuple]:
    """Every option of `bitsmith compile` -> its choices (empty for a free value): which pieces have landed."""
    import click

    from bitsmith.cli import compile as compile_command

    return {opt: tuple(p.type.choices) if isinstance(p.type, click.Choice) else ()
            for p in compile_command.params for opt in p.opts}


def act_parameter() -> str | None:
    """The evaluate_many keyword that turns on the int8-activation emulation, None while it has not landed."""
    from bitsmith.tools.evaluate import evaluate_many

    names = inspect.signature(evaluate_many).parameters
    return next((n for n in ACT_PARAMETERS if n in names), None)


def score_options(spec: RowSpec) -> dict:
    """Keyword arguments of evaluate_many for this row (the activation emulation)."""
    return {} if spec.activations == "float32" else {act_parameter(): spec.activations}


def missing_piece(spec: RowSpec, choices: dict[str, tuple]) -> str | None:
    """Why this row cannot run on the compiler as it is now (a missing flag or choice), or None."""
    def lacks(option: str, value: str) -> str | None:
        if option not in choices:
            return f"bitsmith compile has no {option} yet"
        if choices[option] and value not in choices[option]:
            return f"bitsmith compile {option} does not offer {value} yet"
        return None

    checks = [("--rotate", spec.rotation) if spec.rotation != "none" else None,
              ("--method", spec.method) if spec.method != "none" else None,
              ("--bits", str(spec.bits)) if spec.method != "none" else None,
              ("--kv-dtype", spec.kv) if spec.kv != "auto" else None,
              ("--clip", spec.clip) if spec.clip != "none" else None]
    for check in filter(None, checks):
        if (why := lacks(*check)) is not None:
            return why
    if spec.activations != "float32" and act_parameter() is None:
        return "bitsmith.tools.evaluate has no int8-activation emulation yet"
    return None
