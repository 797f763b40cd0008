"""omoe_ds: the OMoE orthogonal expert optimizer (arXiv 2310.09762), expert-parallel through DeepSpeed."""
from .core.config import OMoEConfig, OMoEConfigError
from .finetune.convert import (SUPPORTED_MODEL_TYPES, MoEConversionConfig, bind_expert_groups, convert_to_moe,
                               moe_aux_loss)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .initialize import initialize
from .experts import make_moe_ffn

__all__ = ["initialize", "save_checkpoint", "load_checkpoint", "CheckpointError", "OMoEConfig", "OMoEConfigError", "make_moe_ffn", "SUPPORTED_MODEL_TYPES", "MoEConversionConfig",
           "bind_expert_groups", "convert_to_moe", "moe_aux_loss"]
