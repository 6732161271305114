"""lora-da: fast, exact data-aware LoRA initialization (LoRA-DA).

>>> import lora_da
>>> init = lora_da.initialize(model, loader, rank=8)
>>> init.apply(peft_model)            # or init.save_pretrained("adapter/")
"""

from ._native import build_info
from .api import initialize, initialize_from_config
from .config import LoraDAConfig
from .result import LoraInit, ModuleInit
from .statistics import KFACStatistics
from .statistics_pass import collect_statistics

__version__ = "0.1.0"

__all__ = [
    "initialize",
    "initialize_from_config",
    "LoraDAConfig",
    "LoraInit",
    "ModuleInit",
    "KFACStatistics",
    "collect_statistics",
    "build_info",
    "__version__",
]
