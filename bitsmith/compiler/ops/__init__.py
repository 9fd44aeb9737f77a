"""Every IR op, defined once: importing this package registers them all (basic, llm, moe, quant, rotation) in OPS."""

from bitsmith.compiler.ops import basic, llm, moe, quant, rotation  # noqa: F401  (registration)
from bitsmith.compiler.ops.registry import (
                                            OPS,
                                            RefContext,
                                            ShapeError,
                                            bind,
                                            infer_types,
                                            register,
                                            reshape_dims,
)

__all__ = ["OPS", "RefContext", "ShapeError", "bind", "infer_types", "register", "reshape_dims"]
