"""Tests for the frozen CLIP text encoder, built from a tiny random model written to disk (nothing is downloaded)."""

import os
import shutil

import pytest
import torch

from opendit.encoders import TextEncoder, build_text_encoder, tiny_text_encoder


pytestmark = pytest.mark.usefixtures("no_network")  # nothing may download (tests/conftest.py)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_text_encoder(str(tmp_path_factory.mktemp("clip") / "tiny"), hidden_size=24)


@pytest.fixture(scope="module")
def encoder(folder):
    return build_text_encoder(folder, device="cpu")


def test_pooled_embedding_shape_dtype_and_determinism(encoder):
    prompts = ["a red circle", "a blue square", "a green cross moving left"]
    emb = encoder.encode(prompts)
    assert emb.shape == (3, 24) and emb.dtype == torch.float32 and encoder.dim == 24
    assert torch.equal(emb, encoder.encode(prompts))
    assert not torch.allclose(emb[0], emb[1])
    encoder.batch_size = 2  # batching does not change the result
    torch.testing.assert_close(encoder.encode(prompts), emb)
    encoder.batch_size = 64


def test_pooled_output_is_the_eos_state(encoder):
    tokens = encoder.tokenizer(["a red circle"], max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    assert tokens.input_ids.shape == (1, 77)
    out = encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    eos = (tokens.input_ids[0] == encoder.model.config.eos_token_id).nonzero()[0, 0]  # first end-of-text token
    assert eos == 1 + len("aredcircle")  # <|startoftext|>, one token per character
    torch.testing.assert_close(encoder.encode(["a red circle"])[0], out.last_hidden_state[0, eos])


def test_null_embedding_and_long_prompts(encoder):
    null = encoder.null_embedding()
    assert null.shape == (1, 24)
    torch.testing.assert_close(null, encoder.encode([""]))
    assert not torch.allclose(null, encoder.encode(["a red circle"]))
    assert encoder.encode(["word " * 200]).shape == (1, 24)  # truncated to 77 tokens
    assert encoder.encode([]).shape == (0, 24)


def test_frozen_and_eval(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training


def test_max_length_is_capped_by_the_position_table(encoder):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**{**encoder.model.config.to_dict(), "max_position_embeddings": 16})
    short = TextEncoder(encoder.tokenizer, CLIPTextModel(config))
    assert short.max_length == 16 and short.encode(["word " * 50]).shape == (1, 24)


def test_pipeline_folder_layout(folder, tmp_path):
    """A diffusers-style folder: tokenizer/ and text_encoder/ subfolders."""
    shutil.copytree(folder, tmp_path / "text_encoder")
    os.makedirs(tmp_path / "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        shutil.move(tmp_path / "text_encoder" / name, tmp_path / "tokenizer" / name)
    torch.testing.assert_close(build_text_encoder(str(tmp_path)).encode(["a"]), build_text_encoder(folder).encode(["a"]))


def test_bad_paths_are_one_line_errors(folder, tmp_path):
    with pytest.raises(ValueError, match="--text_encoder .*no such folder"):
        build_text_encoder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--text_encoder .*is a file"):
        build_text_encoder(os.path.join(folder, "config.json"))
    with pytest.raises(ValueError, match="--text_encoder .*no config.json"):
        build_text_encoder(str(tmp_path))
    shutil.copytree(folder, tmp_path / "no_tokenizer")
    os.remove(tmp_path / "no_tokenizer" / "vocab.json")
    os.remove(tmp_path / "no_tokenizer" / "merges.txt")  # transformers would silently build a 2-token vocabulary
    with pytest.raises(ValueError, match="--text_encoder .*vocab.json"):
        build_text_encoder(str(tmp_path / "no_tokenizer"))
    shutil.copytree(folder, tmp_path / "no_weights")
    os.remove(tmp_path / "no_weights" / "model.safetensors")
    with pytest.raises(ValueError, match="--text_encoder .*could not load") as e:
        build_text_encoder(str(tmp_path / "no_weights"))
    assert "\n" not in str(e.value)
    shutil.copytree(folder, tmp_path / "damaged")
    weights = tmp_path / "damaged" / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])  # the header's length and start overwritten
    with pytest.raises(ValueError, match="--text_encoder .*could not load .*damaged model.safetensors") as e:
        build_text_encoder(str(tmp_path / "damaged"))
    assert "\n" not in str(e.value)
