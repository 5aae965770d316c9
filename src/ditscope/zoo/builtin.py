"""Built-in pipelines that need no download: tiny diffusers models built from configs in this file.

`random-pixart` is a PixArt-alpha-shaped pipeline (PixArtTransformer2DModel with cross-attention to a
small T5 encoder, a word-level tokenizer built here, DPM-Solver) with seeded random weights. It runs
the same code paths as PixArt-alpha in a second on a laptop CPU; its redundancy numbers describe an
untrained network, so use it to try the tool, not to draw conclusions about PixArt.
"""

from __future__ import annotations

import torch

# The caption grammar of the zoo's data: every word a built-in prompt can use.
VOCAB = (
    "[PAD] [UNK] </s> a an the and at in on of with small large medium tiny big red green blue yellow "
    "purple orange cyan magenta white black grey gray pink brown circle square triangle star diamond "
    "cross ring top bottom left right center middle background moving up down"
).split()

MAX_TEXT_TOKENS = 32


def word_tokenizer(vocab=VOCAB, max_length: int = MAX_TEXT_TOKENS):
    """A transformers fast tokenizer over whole words; unknown words map to [UNK]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="</s>",
        model_max_length=max_length,
    )


def random_pixart(seed: int = 0, dtype: torch.dtype = torch.float32):
    """PixArt-alpha-shaped pipeline with random weights: 8 blocks, hidden 64, 256 image tokens."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(VOCAB),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
    )
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=8,
        patch_size=2,
        attention_head_dim=32,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=64,
        caption_channels=32,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    scheduler = DPMSolverMultistepScheduler()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )
    for module in (text_encoder, transformer, vae):
        module.eval()  # freshly built modules are in training mode (dropout on)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
