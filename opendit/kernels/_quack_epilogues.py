"""quack (CuTe-DSL) GEMM epilogues for the MLP; imported only where quack is installed (it imports cutlass)."""
from quack.activation import dgelu_tanh_approx
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.ops import RowVecReduce


@gemm_epilogue(reduces={"dbias": RowVecReduce("dbias")})
def dgelu_dbias(acc, c):
    """acc: the gradient of GELU's output; c: GELU's input. D = the gradient of GELU's input, dbias its column sums."""
    dx, _ = dgelu_tanh_approx(c, acc)
    return {"D": dx, "dbias": dx}
