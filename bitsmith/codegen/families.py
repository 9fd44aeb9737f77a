"""Every kernel family the lowering pass can emit, in one namespace."""

from bitsmith.codegen.attention import AttentionSpec
from bitsmith.codegen.elementwise import BiasAddSpec, BinarySpec, GeluMulSpec, SiluMulSpec, UnarySpec
from bitsmith.codegen.embedding import EmbeddingSpec, QEmbeddingSpec
from bitsmith.codegen.gemm import GemmSpec
from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.gemv_int8 import QGemvI8Spec, int8_activations_supported
from bitsmith.codegen.gemv_x16 import QGemvX16Spec
from bitsmith.codegen.norm_rope import AddRmsNormSpec, LayerNormSpec, RmsNormSpec, RopeSpec
from bitsmith.codegen.paged_attention import PagedAttentionSpec

__all__ = [
    "AddRmsNormSpec", "AttentionSpec", "BiasAddSpec", "BinarySpec", "EmbeddingSpec", "GeluMulSpec", "GemmSpec",
    "GemvSpec", "LayerNormSpec", "PagedAttentionSpec", "QEmbeddingSpec", "QGemvI8Spec", "QGemvX16Spec", "RmsNormSpec",
    "RopeSpec", "SiluMulSpec", "UnarySpec", "int8_activations_supported",
]
