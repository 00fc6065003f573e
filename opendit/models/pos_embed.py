"""Fixed sine-cosine position tables (MAE / DiT convention), computed in numpy float64."""
import numpy as np


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Table of shape (len(pos), embed_dim): half sin, half cos, frequencies 1 / 10000^(2i/D)."""
    assert embed_dim % 2 == 0, "embed_dim must be even"
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    angles = np.einsum("m,d->md", pos, omega)  # (M, D/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """Half of the channels encode grid[0], the other half grid[1]."""
    assert embed_dim % 2 == 0, "embed_dim must be even"
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)  # (H*W, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size) -> np.ndarray:
    """Table of shape (H*W, embed_dim) for a row-major H x W token grid (int = square)."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w first, as in MAE: each is (H, W)
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def get_1d_sincos_pos_embed(embed_dim: int, length: int) -> np.ndarray:
    """Table of shape (length, embed_dim) for positions 0..length-1."""
    return get_1d_sincos_pos_embed_from_grid(embed_dim, np.arange(length, dtype=np.float32))


def get_3d_sincos_pos_embed(embed_dim: int, grid_size) -> np.ndarray:
    """Table of shape (t*h*w, embed_dim) for tokens ordered (t, h, w), as in OpenDiT's first video model (vDiT):
    the first embed_dim/4 channels are a 1-D table of the frame index, the other 3*embed_dim/4 a 2-D table of (h, w)."""
    t, h, w = grid_size
    if embed_dim % 16:
        raise ValueError(f"a 3-D sin-cos table needs a hidden size divisible by 16, got {embed_dim}")
    temporal = get_1d_sincos_pos_embed(embed_dim // 4, t)  # (t, D/4)
    spatial = get_2d_sincos_pos_embed(embed_dim // 4 * 3, (h, w))  # (h*w, 3D/4)
    temporal = np.broadcast_to(temporal[:, None], (t, h * w, temporal.shape[1]))  # (t, h*w, D/4)
    spatial = np.broadcast_to(spatial[None], (t, h * w, spatial.shape[1]))  # (t, h*w, 3D/4)
    return np.concatenate([temporal, spatial], axis=-1).reshape(t * h * w, embed_dim)  # (t*h*w, D)
