"""fc1 + bias + tanh GELU, and its gradient through fc2's input gradient: cuBLAS + our Triton pass against quack's GEMM epilogues.

    python bench/quack_mlp.py [--model DiT-XL/2] [--batch_size 128] [--configs default,128x192p2x1,256x128c2x1]

One block's MLP at the model's M = batch x tokens rows, bf16, each way timed alone in a CUDA graph of 20 calls over two
input sets (bench.timing.graphed_us):
- forward: fc1's cuBLAS GEMM + kernels/fused_gelu's Triton bias + GELU pass (what training runs), against quack's one
  GEMM with bias + GELU in its epilogue (pre-activation and activation written);
- backward: fc2's cuBLAS input-gradient GEMM + the Triton GELU backward (which sums the bias gradient) and the sum of
  its partials, against quack's one GEMM with GELU's derivative and the bias-gradient sum in its epilogue;
- each GEMM alone, cuBLAS and quack (its default config), for the epilogues' cost.
A config is quack's GemmConfig as `128x192p2x1` (tile M x N, p(ingpong) or c(ooperative), cluster M x N). Then each
way's largest error against float64, relative to the reference's largest magnitude. Needs quack-kernels and a Hopper GPU.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.gemm_shapes import alternate, shape_parser  # noqa: E402
from bench.timing import graphed_us  # noqa: E402
from opendit.models import DiT_models  # noqa: E402


def timed(name: str, fn) -> float:
    """fn's microseconds in a CUDA graph; NaN (and the error, one line) when it fails."""
    try:
        return graphed_us(fn)
    except Exception as e:  # a config quack cannot build must not end the table
        print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        torch.cuda.synchronize()
        return float("nan")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    p = shape_parser(__doc__)
    p.add_argument("--configs", default="default", help="comma-separated quack configs (see above); default: quack's own")
    args = p.parse_args()
    from quack.gemm_interface import gemm as quack_gemm

    from opendit.kernels import _triton_ops as ops
    from opendit.kernels import quack_mlp as qm

    with torch.device("meta"):
        model = DiT_models[args.model](input_size=args.latent_size)
    C, H = model.blocks[0].mlp.fc1.in_features, model.blocks[0].mlp.fc1.out_features
    M = args.batch_size * model.x_embedder.num_patches
    dev = torch.device("cuda")
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    torch.manual_seed(0)
    w1, b1 = torch.randn(H, C, **bf16) / C ** 0.5, torch.randn(H, **bf16) * 0.1
    w2 = torch.randn(C, H, **bf16) / H ** 0.5
    xs, dzs = [torch.randn(M, C, **bf16) for _ in range(2)], [torch.randn(M, C, **bf16) for _ in range(2)]
    x, dz = alternate(xs), alternate(dzs)
    pre_ours = [torch.mm(t, w1.t()) for t in xs]  # fc1 without its bias, as training keeps it
    pre_q = [t + b1 for t in pre_ours]  # with it, as quack keeps it
    pre_o, pre_qk = alternate(pre_ours), alternate(pre_q)
    print(f"{args.model}, batch {args.batch_size}: M = {M}, C = {C}, hidden = {H}, bf16, {torch.cuda.get_device_name()}\n")

    def ours_bwd():
        dh, partials = ops.bias_gelu_bwd_partials(torch.mm(dz(), w2), pre_o(), b1)
        return dh, partials.sum(0)

    rows = [
        ("fc1 forward: cuBLAS GEMM alone", lambda: torch.mm(x(), w1.t())),
        ("fc1 forward: cuBLAS GEMM + Triton bias + GELU (training now)", lambda: ops.bias_gelu_fwd(torch.mm(x(), w1.t()), b1)),
        ("fc2 input grad: cuBLAS GEMM alone", lambda: torch.mm(dz(), w2)),
        ("fc2 input grad: cuBLAS GEMM + Triton GELU backward + bias sum (training now)", ours_bwd),
        ("fc1 forward: quack GEMM alone (its default config)", lambda: quack_gemm(x(), w1.t(), tuned=False)),
        ("fc2 input grad: quack GEMM alone (its default config)", lambda: quack_gemm(dz(), w2, tuned=False)),
    ]
    for spec in args.configs.split(","):
        os.environ["OPENDIT_QUACK_CONFIG"] = "" if spec == "default" else spec
        rows += [
            (f"fc1 forward: quack GEMM + bias + GELU epilogue [{spec}]", lambda: qm.fc1_gelu(x(), w1, b1)),
            (f"fc2 input grad: quack GEMM + GELU backward + bias sum epilogue [{spec}]", lambda: qm.dgelu_dbias(dz(), w2, pre_qk())),
        ]
    print("| way | us | TFLOP/s (GEMM) |\n|---|---:|---:|")
    flops = 2 * M * C * H
    for name, fn in rows:
        if "[" in name:
            os.environ["OPENDIT_QUACK_CONFIG"] = "" if name.endswith("[default]") else name.rsplit("[", 1)[1][:-1]
        us = timed(name, fn)
        print(f"| {name} | {us:.1f} | {flops / us / 1e6:.0f} |", flush=True)

    # errors against float64, one input set
    x0, dz0, pre0 = xs[0], dzs[0], pre_ours[0]
    ref_pre = x0.double() @ w1.double().t() + b1.double()
    ref_h = torch.nn.functional.gelu(ref_pre, approximate="tanh")
    pre_b = pre0.double() + b1.double()  # the backward's reference at training's rounded pre-activation
    t = torch.tanh(0.7978845608028654 * (pre_b + 0.044715 * pre_b ** 3))
    dgelu = 0.5 * (1 + t) + 0.5 * pre_b * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * pre_b ** 2)
    ref_dpre = (dz0.double() @ w2.double()) * dgelu
    os.environ["OPENDIT_QUACK_CONFIG"] = ""
    h_ours = ops.bias_gelu_fwd(pre0, b1)
    qpre, qh = qm.fc1_gelu(x0, w1, b1)
    d_ours, p_ours = ops.bias_gelu_bwd_partials(torch.mm(dz0, w2), pre0, b1)
    d_q, db_q = qm.dgelu_dbias(dz0, w2, pre_q[0])
    print("\n| error vs float64 (max abs / max ref) | ours | quack |\n|---|---:|---:|")
    print(f"| fc1 activation | {rel_err(h_ours, ref_h):.2e} | {rel_err(qh, ref_h):.2e} |")
    print(f"| fc1 pre-activation (quack keeps it with the bias) | {rel_err(pre0 + b1, ref_pre):.2e} | {rel_err(qpre, ref_pre):.2e} |")
    print(f"| GELU input gradient | {rel_err(d_ours, ref_dpre):.2e} | {rel_err(d_q, ref_dpre):.2e} |")
    print(f"| bias gradient | {rel_err(p_ours.sum(0), ref_dpre.sum(0)):.2e} | {rel_err(db_q, ref_dpre.sum(0)):.2e} |")


if __name__ == "__main__":
    main()
