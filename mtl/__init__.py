"""mtl: transfer learning for PyTorch research (fine-tuning, multitask learning, progressive networks)."""
from .errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
