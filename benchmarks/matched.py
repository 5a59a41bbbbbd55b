"""vtfuse's captioner and transformers' VisionEncoderDecoderModel (ViT encoder, GPT-2 decoder
with cross-attention) built at the same dimensions, with random weights and no downloads.

Both are a ViT over `image_size / patch_size`² patches, then a causal decoder whose blocks are
self-attention → cross-attention → MLP (pre-norm, GELU, MLP width 4 × hidden), with a tied
output layer. The remaining differences are small and listed in `DIFFERENCES`; the benchmark's
unit test checks that the parameter counts agree within 2 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vtfuse.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
from vtfuse.models.factory import create_model

DIFFERENCES = (
    "transformers' ViT has a [CLS] token, 1-D position embeddings and a pooler; "
    "vtfuse's ViT has factorised 2-D position embeddings (row + column)"
)


@dataclass(frozen=True)
class Size:
    name: str
    image_size: int
    patch_size: int
    hidden: int
    layers: int  # in the encoder and again in the decoder
    heads: int
    vocab: int
    new_tokens: int = 24  # caption length generated (and trained on)

    @property
    def mlp(self) -> int:
        return 4 * self.hidden

    @property
    def max_length(self) -> int:
        return self.new_tokens + 8  # <bos>, the caption and room to spare


SIZES = {
    "small": Size("small", image_size=64, patch_size=8, hidden=256, layers=4, heads=4, vocab=1000),
    "base": Size("base", image_size=224, patch_size=16, hidden=512, layers=6, heads=8, vocab=32000),
}


def vtfuse_captioner(size: Size) -> nn.Module:
    return create_model(vtfuse_config(size)).eval()


def vtfuse_config(size: Size) -> ModelConfig:
    return ModelConfig(
        task="caption",
        vision=VisionConfig(
            name="vit",
            image_size=size.image_size,
            patch_size=size.patch_size,
            dim=size.hidden,
            depth=size.layers,
            heads=size.heads,
        ),
        text=TextConfig(
            vocab_size=size.vocab,
            dim=size.hidden,
            depth=size.layers,
            heads=size.heads,
            max_length=size.max_length,
            dropout=0.0,  # as the transformers model below: the same arithmetic in training
        ),
        fusion=FusionConfig(name="cross_attention"),
    )


def hf_captioner(size: Size) -> nn.Module:
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    encoder = ViTConfig(
        image_size=size.image_size,
        patch_size=size.patch_size,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.mlp,
        hidden_act="gelu",
    )
    decoder = GPT2Config(
        vocab_size=size.vocab,
        n_positions=size.max_length,
        n_embd=size.hidden,
        n_layer=size.layers,
        n_head=size.heads,
        n_inner=size.mlp,
        activation_function="gelu",
        resid_pdrop=0.0,  # GPT-2's default 0.1, as vtfuse's captioner's: both without here
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        add_cross_attention=True,
        is_decoder=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=config).eval()
    model.config.use_cache = True
    return model


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
