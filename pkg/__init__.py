"""kvtier: a KV-cache tiering daemon for long-context LLM inference.

Subpackages:
    kvtier.daemon  the trio service and its storage engine (folder daemon/)
    kvtier.client  the library inference processes import (folder client/)
    kvtier.fuse    the admin FUSE tree (folder fuse/)
"""

__version__ = "0.1.0"
