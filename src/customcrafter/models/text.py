"""VideoCrafter2's text conditioning: OpenCLIP ViT-H-14's text tower up to its penultimate block, then ``ln_final``.

In transformers terms that is a ``CLIPTextModel`` with one layer fewer than the OpenCLIP tower (23 for ViT-H-14) whose
``last_hidden_state`` (it includes ``final_layer_norm`` = ``ln_final``) is fed to cross-attention. The tokenizer is
CLIP's byte-pair tokenizer over the vocabulary shipped with this package, padding with ``"!"`` (id 0) as OpenCLIP
does, so tokenization needs no download.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

#: OpenCLIP ViT-H-14 text tower (what VideoCrafter2 ships with).
VIT_H_14_TEXT = {"width": 1024, "heads": 16, "layers": 24, "vocab_size": 49408, "context_length": 77}

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
PAD_TOKEN = "!"  # OpenCLIP pads with zeros; id 0 is "!"


def openclip_text_config(
    width: int = 1024,
    heads: int = 16,
    layers: int = 24,
    vocab_size: int = 49408,
    context_length: int = 77,
    mlp_ratio: float = 4.0,
    skip_last_layers: int = 1,
) -> CLIPTextConfig:
    """``CLIPTextConfig`` for an OpenCLIP text tower of the given size, cut after ``layers - skip_last_layers`` blocks.

    ``skip_last_layers=1`` is VideoCrafter2's "penultimate" layer choice. OpenCLIP's text towers use exact GELU and
    LayerNorm eps 1e-5.
    """
    if not 0 <= skip_last_layers < layers:
        raise ValueError(f"skip_last_layers={skip_last_layers} must be in 0..{layers - 1}")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=int(width * mlp_ratio),
        projection_dim=width,
        num_hidden_layers=layers - skip_last_layers,
        num_attention_heads=heads,
        max_position_embeddings=context_length,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )


def build_text_encoder(config: CLIPTextConfig) -> CLIPTextModel:
    """A randomly initialised (or to-be-loaded) text encoder in eval mode, with PyTorch SDPA attention."""
    config._attn_implementation = "sdpa"
    return CLIPTextModel(config).eval()


def tokenizer_dir() -> Path:
    """Folder of the packaged ``vocab.json`` / ``merges.txt``."""
    return Path(str(resources.files("customcrafter.models") / "tokenizer"))


def load_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP tokenizer over the packaged vocabulary, padding with ``"!"`` (id 0) to ``model_max_length`` like OpenCLIP."""
    folder = tokenizer_dir()
    return CLIPTokenizer.from_pretrained(
        str(folder), pad_token=PAD_TOKEN, model_max_length=model_max_length, local_files_only=True
    )


def tokenize(tokenizer: CLIPTokenizer, prompts: str | list[str]) -> torch.Tensor:
    """Token ids (B, model_max_length): bos … eos, padded with id 0, truncated with eos kept last."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def encode_prompt(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    prompts: str | list[str],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Prompts → cross-attention context (B, 77, D): the tower's penultimate block output after ``ln_final``.

    No padding mask, as OpenCLIP (causal attention only).
    """
    device = device if device is not None else text_encoder.device
    return encode_tokens(text_encoder, tokenize(tokenizer, prompts).to(device))


def encode_tokens(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Token ids (B, 77) on the encoder's device → cross-attention context (B, 77, D) (see :func:`encode_prompt`)."""
    return text_encoder(input_ids=input_ids).last_hidden_state
