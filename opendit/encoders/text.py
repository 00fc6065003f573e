"""Frozen CLIP text encoder: prompts -> pooled (N, dim) embeddings (the EOS token's final state), as OpenDiT uses.

Only ``pooler_output`` conditions the DiT (added to the timestep embedding through ``DiT.text_embedder``); there is
no cross-attention, so the per-token states are not kept. The empty prompt "" is the null condition for
classifier-free guidance.
"""

import json
import os
import string

import torch
from torch import nn

from .hub import HUB_ID, load_local_or_hub

DEFAULT_TEXT_ENCODER = "openai/clip-vit-base-patch32"
MAX_LENGTH = 77  # CLIP's context length


class TextEncoder(nn.Module):
    """Frozen CLIPTokenizer + CLIPTextModel; ``encode(prompts)`` gives fp32 pooled embeddings (N, dim)."""

    def __init__(self, tokenizer, model: nn.Module, batch_size: int = 64):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)
        self.max_length = min(MAX_LENGTH, int(model.config.max_position_embeddings))
        self._null = {}  # device -> the empty prompt's embedding, encoded once
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        """Stay in eval mode: the text encoder is always frozen."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, prompts: list) -> torch.Tensor:
        """Prompts -> (N, dim) fp32 pooled embeddings on the model's device, ``batch_size`` prompts at a time."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not one string")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            tokens = self.tokenizer(chunk, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt")
            pooled = self.model(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)).pooler_output
            out.append(pooled.float())  # (n, dim)
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=device)

    def null_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding (1, dim): the unconditional branch of classifier-free guidance (encoded once
        per device: training asks for it every step)."""
        device = next(self.model.parameters()).device
        if device not in self._null:
            self._null[device] = self.encode([""])
        return self._null[device]

    def forward(self, prompts: list) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(prompts)


def _subfolders(path: str, label: str) -> tuple:
    """(tokenizer, model) subfolder names: none for a CLIP folder, tokenizer/ + text_encoder/ for a pipeline folder."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "text_encoder", "config.json")):
            return "tokenizer", "text_encoder"
        raise ValueError(f"--text_encoder {label}: no config.json in this folder (expected a CLIP text model and its tokenizer)")
    return "", ""


def _load(path: str, subfolders: tuple, local_files_only: bool, dtype: torch.dtype):
    """CLIPTokenizer and CLIPTextModel from one folder or hub id, without transformers' progress bars."""
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder=subfolders[0], local_files_only=local_files_only)
        model = CLIPTextModel.from_pretrained(path, subfolder=subfolders[1], local_files_only=local_files_only, dtype=dtype)
    except SafetensorError as e:  # a damaged weights file: an OSError, which the caller reports in one line
        raise OSError(f"damaged model.safetensors: {e}") from None
    finally:
        if bars:
            logging.enable_progress_bar()
    return tokenizer, model


def build_text_encoder(name_or_path: str = DEFAULT_TEXT_ENCODER, device="cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    """A frozen CLIP text encoder from a local folder or a hub id (the local cache is tried before the network)."""
    path = os.path.expanduser(str(name_or_path).strip())
    if not os.path.exists(path) and not HUB_ID.match(path):
        raise ValueError(f"--text_encoder {name_or_path}: no such folder (use a local CLIP folder or a hub id such as {DEFAULT_TEXT_ENCODER})")
    if os.path.isfile(path):
        raise ValueError(f"--text_encoder {name_or_path}: is a file; pass the folder holding config.json and the tokenizer files")
    subfolders = _subfolders(path, name_or_path)
    loaded = load_local_or_hub(lambda local_only: _load(path, subfolders, local_only, dtype), path, f"--text_encoder {name_or_path}", "a CLIP text model and its tokenizer")
    tokenizer, model = loaded
    if not 2 < len(tokenizer) <= model.config.vocab_size:  # transformers builds a 2-token vocabulary when files are missing
        found = f"a tokenizer of {len(tokenizer)} tokens for a model of {model.config.vocab_size}"
        raise ValueError(f"--text_encoder {name_or_path}: {found} (missing vocab.json / merges.txt?)")
    return TextEncoder(tokenizer, model.to(device))


def tiny_text_encoder(path: str, hidden_size: int = 32, seed: int = 0) -> str:
    """Write a tiny random CLIP text model and a character-level tokenizer to ``path`` (offline); returns ``path``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    chars = string.ascii_lowercase + string.digits + ".,!?'-"  # the tokenizer lowercases; whitespace splits words
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})  # word-final characters
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})  # eos is also padding and unknown
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")  # no merges: one token per character
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only, which fork_rng restores
        model = CLIPTextModel(config)
    model.save_pretrained(path)
    return path
