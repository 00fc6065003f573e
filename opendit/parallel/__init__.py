"""Sequence parallelism for DiT/VDiT: FastSeq (AllGather + ring overlap, AllToAll) and Ulysses, applied from outside.

Layout: a (dp, sp) mesh (mesh.py); the tokens are split after the embedding and gathered after the final layer
(comm.py); every block's attention communicates over the sp group (attention.py, gather_linear.py).

Rules for a training loop (the sp ranks of one dp replica must compute the same thing):
- data: shard by dp only (sampler rank = dp rank, replicas = dp size); seed with global_seed * dp_size + dp_rank,
  so the sp ranks draw the same t, noise and label drops; broadcast_from_sp_leader(x, y, t, noise) makes the
  batch identical even where the VAE is not bit-reproducible.
- gradients: each sp rank's parameter gradients are partial sums; the gradient of the dp replica's loss is their SUM
  over sp. Either average over the whole world (DDP/FSDP over all ranks) and back-propagate loss * sp_size, or
  average over dp only and call sp_all_reduce_grads(model, sp_group) after backward (before clipping).
- shapes: the heads and the tokens (frames x patches) must divide by the sp size; there is no padding (padded tokens
  would need an attention mask), a one-line ValueError says which does not divide.
"""
from opendit.parallel.apply import KINDS, apply_sequence_parallel, broadcast_from_sp_leader, sp_all_reduce_grads
from opendit.parallel.mesh import build_mesh

__all__ = ["KINDS", "apply_sequence_parallel", "broadcast_from_sp_leader", "build_mesh", "sp_all_reduce_grads"]
