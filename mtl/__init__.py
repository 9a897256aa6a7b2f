"""mtl: transfer learning for PyTorch research (fine-tuning, multitask learning, progressive networks)."""

from mtl.core import legacy
from mtl.core.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]

legacy.install()  # mtl.trainer, mtl.heads, ...: the module paths before the layered layout
