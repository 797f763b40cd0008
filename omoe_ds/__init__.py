"""omoe_ds: the OMoE orthogonal expert optimizer (arXiv 2310.09762), expert-parallel through DeepSpeed."""
from .config import OMoEConfig, OMoEConfigError
from .initialize import initialize
from .moe_layers import make_moe_ffn

__all__ = ["initialize", "OMoEConfig", "OMoEConfigError", "make_moe_ffn"]
