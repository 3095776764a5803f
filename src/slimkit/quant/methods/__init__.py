"""The built-in quantization methods, one file each; importing this package registers them.

A new method is one more file like these (its config dataclass, its
:class:`~slimkit.quant.method.QuantMethod`, ``register_method``) and one
import line here.
"""

# isort: off
# Registration order is the order that messages and recipe docs list the methods in.
from slimkit.quant.methods.int8_dynamic import Int8DynamicConfig
from slimkit.quant.methods.int8_static import Int8StaticConfig
from slimkit.quant.methods.weight_only import WeightOnlyConfig
from slimkit.quant.methods.qat import QATConfig
from slimkit.quant.methods.bf16 import BF16Config
from slimkit.quant.methods.mixed import MixedPrecisionConfig
from slimkit.quant.methods.awq import AWQConfig
from slimkit.quant.methods.codebook import CodebookConfig

# isort: on

__all__ = [
    "AWQConfig",
    "BF16Config",
    "CodebookConfig",
    "Int8DynamicConfig",
    "Int8StaticConfig",
    "MixedPrecisionConfig",
    "QATConfig",
    "WeightOnlyConfig",
]
