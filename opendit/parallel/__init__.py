"""Everything that splits work over processes: the process group (process.py), the (dp, sp) mesh and its views
(mesh.py), parallelize() (parallelize.py: kernels, sequence parallelism, checkpointing, compile, FSDP2 / DDP), and
sequence parallelism for DiT/VDiT: FastSeq (AllGather + ring overlap, AllToAll) and Ulysses (sequence.py, attention.py,
gather_linear.py, comm.py, collectives.py).

Sequence parallelism reaches the model from outside: tokens are split as they enter the first block and gathered
as they leave the final layer (module hooks); every block's attention communicates over the sp group.

Rules for a training loop (the sp ranks of one dp replica must compute the same thing):
- data: shard by dp only (sampler rank = dp rank, replicas = dp size); seed with global_seed * dp_size + dp_rank,
  so the sp ranks draw the same t, noise and label drops; ParallelMesh.share_sample(x, t, noise, ...) makes the
  batch identical even where the VAE is not bit-reproducible.
- gradients: each sp rank's parameter gradients are partial sums; the gradient of the dp replica's loss is their SUM
  over sp. Either average over the whole world (DDP/FSDP over all ranks, what parallelize() does) and back-propagate
  ParallelMesh.gradient_loss(loss) (loss * sp_size), or average over dp only and call
  sp_all_reduce_grads(model, sp_group) after backward (before clipping).
- shapes: the heads and the tokens (frames x patches) must divide by the sp size; there is no padding (padded tokens
  would need an attention mask), a one-line ValueError says which does not divide.
"""
from opendit.parallel.mesh import ParallelMesh, build_mesh
from opendit.parallel.parallelize import parallelize
from opendit.parallel.sequence import KINDS, apply_sequence_parallel, sp_all_reduce_grads

__all__ = ["KINDS", "ParallelMesh", "apply_sequence_parallel", "build_mesh", "parallelize", "sp_all_reduce_grads"]
