"""kvtier.fuse: the admin FUSE tree (a thin view over daemon state)."""
