"""chattune: turn a small pre-trained causal language model into a chat assistant."""

__version__ = "0.1.0"

from chattune.config import Config  # noqa: E402
from chattune.errors import ChattuneError  # noqa: E402

__all__ = ["Config", "ChattuneError", "__version__"]
