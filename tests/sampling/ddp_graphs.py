"""sample_ddp.py, then whether this rank's engines captured the step as CUDA graphs (test_denoise.py runs it):

    torchrun --standalone --nproc_per_node N tests/sampling/ddp_graphs.py SAMPLE_DDP_FLAGS...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from opendit.sampling import sample_ddp  # noqa: E402
from opendit.sampling.denoise import _ENGINES  # noqa: E402

if __name__ == "__main__":
    sample_ddp.main(sys.argv[1:])
    captured = bool(_ENGINES) and all(engine.cuda_graph and engine.graphs for engine in _ENGINES.values())
    print(f"rank {os.environ.get('RANK', '0')} captured: {'yes' if captured else 'no'}", flush=True)
