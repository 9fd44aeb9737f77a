"""Every kernel family the lowering pass can emit, in one namespace."""

from bitsmith.codegen.attention import AttentionSpec
from bitsmith.codegen.elementwise import BiasAddSpec, BinarySpec, GeluMulSpec, SiluMulSpec, UnarySpec
from bitsmith.codegen.embedding import EmbeddingSpec, QEmbeddingSpec
from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.norm_rope import AddRmsNormSpec, LayerNormSpec, RmsNormSpec, RopeSpec

__all__ = [
    "AddRmsNormSpec", "AttentionSpec", "BiasAddSpec", "BinarySpec", "EmbeddingSpec", "GeluMulSpec", "GemvSpec",
    "LayerNormSpec", "QEmbeddingSpec", "RmsNormSpec", "RopeSpec", "SiluMulSpec", "UnarySpec",
]
