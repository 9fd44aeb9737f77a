"""Every kernel family the lowering pass can emit, in one namespace."""

from bitsmith.codegen.elementwise import BiasAddSpec, BinarySpec, GeluMulSpec, SiluMulSpec, UnarySpec
from bitsmith.codegen.embedding import EmbeddingSpec, QEmbeddingSpec
from bitsmith.codegen.gemm import GemmSpec
from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.gemv_int8 import QGemvI8Spec
from bitsmith.codegen.gemv_x16 import QGemvX16Spec
from bitsmith.codegen.hadamard import HadamardSpec, RopeHadamardSpec
from bitsmith.codegen.norm_rope import AddRmsNormSpec, LayerNormSpec, RmsNormSpec, RopeSpec
from bitsmith.codegen.moe import MoeSpec, RouterSpec
from bitsmith.codegen.paged_attention import PagedAttentionSpec
from bitsmith.codegen.scalar_slice import GatherSpec, ScalarSpec, SliceSpec

__all__ = [
    "AddRmsNormSpec", "BiasAddSpec", "BinarySpec", "EmbeddingSpec", "GatherSpec", "GeluMulSpec", "GemmSpec", "GemvSpec",
    "HadamardSpec", "LayerNormSpec", "MoeSpec", "PagedAttentionSpec", "QEmbeddingSpec", "QGemvI8Spec", "QGemvX16Spec",
    "RmsNormSpec", "RopeHadamardSpec", "RopeSpec", "RouterSpec", "ScalarSpec", "SiluMulSpec", "SliceSpec", "UnarySpec",
]
