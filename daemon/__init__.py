"""kvtier.daemon: the storage engine and (later) the trio service."""
