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


def imported_form_problems(bits: int, group_size: int, offset: bool = False, super_group: int = 0) -> list[str]:
    """The weight forms of imported checkpoints (GGUF Q5_*, K-quants) that only the float-activation matmuls
    (GemvSpec, GemmSpec) read: 5/6-bit codes, groups of 16, the min form (w = s*q + m), two-level scales."""
    problems = []
    if bits in (5, 6):
        problems.append(f"{bits}-bit codes")
    if group_size == 16:
        problems.append("groups of 16")
    if offset:
        problems.append("the min form (w = s*q + m)")
    if super_group:
        problems.append(f"two-level scales (super group {super_group})")
    return problems


IMPORTED_FORM_FIX = ("these forms (GGUF Q5_0/Q5_1 and K-quants) have float32-activation kernels only: use GemvSpec / "
                     "GemmSpec (compile with --activations float32, or auto, which picks them for such weights)")
