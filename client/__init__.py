"""kvtier.client: the public side, imported by inference processes."""
