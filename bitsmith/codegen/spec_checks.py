"""How a kernel spec refuses a description it cannot build: one error listing every problem (no TVM here, so
targets, whose constants the compile options read, load without it)."""

from __future__ import annotations

from bitsmith.errors import BitsmithError

# stored dtypes of dense weights (norm weights, biases, tables, matmul weights) -> name token; bfloat16 reaches
# a kernel as its uint16 bit pattern (bitsmith.runtime.kernel_dtypes)
PARAM_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
DENSE_BITS = {32: "float32", 16: "float16"}  # a matmul spec's `bits` for dense (unquantized) weights -> dtype
DENSE_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}  # dense matmul weight dtype -> a spec's `bits`


def refuse(problems: list[str], family: str, fix: str = "pick a supported kernel description") -> None:
    """Raise one BitsmithError listing every problem of a spec (nothing when the list is empty)."""
    if problems:
        raise BitsmithError(f"cannot build a {family} kernel for " + ", ".join(problems),
                            where=f"codegen {family}", fix=fix)


def check_positive(problems: list[str], **sizes: int) -> None:
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key} {value!r} (must be a positive integer)")


def check_param_dtype(problems: list[str], dtype: str, what: str = "weight") -> None:
    if dtype not in PARAM_DTYPES:
        problems.append(f"{what} dtype {dtype!r} (use one of {tuple(PARAM_DTYPES)})")
