"""Data-parallel training machinery: the device mesh, the sharded EMA and DCP checkpoints."""
