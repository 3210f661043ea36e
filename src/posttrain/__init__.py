"""posttrain: the language-model post-training pipeline of the RLHF book.

Import what you need from its modules (``posttrain.data``, ``posttrain.losses``, ``posttrain.sft``, ...);
this package ``__init__`` imports nothing heavy.
"""

__version__ = "0.1.0"
