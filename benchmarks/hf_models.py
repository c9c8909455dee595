"""Popular `transformers` model classes built from tiny configs (random weights, nothing
downloaded), for `benchmarks/coverage.py --hf`: text, vision and audio.

Each entry: name -> (model type, class name, config keywords, input kind). Inputs: "tokens"
(2 x 8 token ids), "image" (2 x 3 x 32 x 32), "audio" (2 x 1600 samples), "mel" (2 x 80
x 32 log-mel frames), "spectrogram" (2 x 32 frames x 16 mel bins).
"""

from __future__ import annotations

import torch

V = 100
TEXT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
DECODER = dict(TEXT, bos_token_id=0, eos_token_id=0, pad_token_id=0)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=64, num_labels=5)
CNN = dict(num_labels=5)

MODELS = {
    # text: encoders
    "bert": ("bert", "BertForSequenceClassification", dict(TEXT, num_labels=3), "tokens"),
    "roberta": ("roberta", "RobertaForSequenceClassification",
                dict(TEXT, num_labels=3, pad_token_id=1), "tokens"),
    "xlm-roberta": ("xlm-roberta", "XLMRobertaForSequenceClassification",
                    dict(TEXT, num_labels=3, pad_token_id=1), "tokens"),
    "distilbert": ("distilbert", "DistilBertForSequenceClassification",
                   dict(vocab_size=V, dim=32, hidden_dim=64, n_heads=4, n_layers=2,
                        max_position_embeddings=64, num_labels=3), "tokens"),
    "albert": ("albert", "AlbertForSequenceClassification",
               dict(TEXT, embedding_size=16, num_labels=3), "tokens"),
    "electra": ("electra", "ElectraForSequenceClassification",
                dict(TEXT, embedding_size=32, num_labels=3), "tokens"),
    "deberta-v2": ("deberta-v2", "DebertaV2ForSequenceClassification",
                   dict(TEXT, num_labels=3), "tokens"),
    # text: decoders (causal LMs)
    "gpt2": ("gpt2", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                              n_positions=64, bos_token_id=0, eos_token_id=0),
             "tokens"),
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", DECODER, "tokens"),
    "llama": ("llama", "LlamaForCausalLM", dict(DECODER, num_key_value_heads=2), "tokens"),
    "mistral": ("mistral", "MistralForCausalLM", dict(DECODER, num_key_value_heads=2),
                "tokens"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", dict(DECODER, num_key_value_heads=2), "tokens"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", dict(DECODER, num_key_value_heads=2, head_dim=8),
              "tokens"),
    "gemma": ("gemma", "GemmaForCausalLM", dict(DECODER, num_key_value_heads=2, head_dim=8),
              "tokens"),
    "phi": ("phi", "PhiForCausalLM", DECODER, "tokens"),
    "phi3": ("phi3", "Phi3ForCausalLM", dict(DECODER, num_key_value_heads=2), "tokens"),
    "opt": ("opt", "OPTForCausalLM", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, ffn_dim=64,
                                          word_embed_proj_dim=32, max_position_embeddings=64,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=1),
            "tokens"),
    "bloom": ("bloom", "BloomForCausalLM", dict(vocab_size=V, hidden_size=32, n_layer=2,
                                                n_head=4, bos_token_id=0, eos_token_id=0),
              "tokens"),
    "falcon": ("falcon", "FalconForCausalLM", dict(DECODER, new_decoder_architecture=False),
               "tokens"),
    # Gemma 3n's text model: a list of MLP widths, one per layer (the first sparse, as
    # Gemma 3n's first ten layers are: a cutoff from the std over the MLP's channels)
    "gemma3n": ("gemma3n_text", "Gemma3nForCausalLM",
                dict(DECODER, intermediate_size=[64, 48, 40], num_hidden_layers=3,
                     num_key_value_heads=2, head_dim=8, vocab_size_per_layer_input=V,
                     hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2,
                     num_kv_shared_layers=0, sliding_window=4,
                     layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                     activation_sparsity_pattern=[0.95, 0.0, 0.0]), "tokens"),
    # vision
    "vit": ("vit", "ViTForImageClassification", VISION, "image"),
    "deit": ("deit", "DeiTForImageClassification", VISION, "image"),
    "beit": ("beit", "BeitForImageClassification", VISION, "image"),
    "dinov2": ("dinov2", "Dinov2ForImageClassification", VISION, "image"),
    "swin": ("swin", "SwinForImageClassification",
             dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                  window_size=4, num_labels=5), "image"),
    "convnext": ("convnext", "ConvNextForImageClassification",
                 dict(CNN, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), "image"),
    "resnet": ("resnet", "ResNetForImageClassification",
               dict(CNN, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]), "image"),
    "regnet": ("regnet", "RegNetForImageClassification",
               dict(CNN, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4),
               "image"),
    "mobilenet_v2": ("mobilenet_v2", "MobileNetV2ForImageClassification",
                     dict(CNN, depth_multiplier=0.35, image_size=32), "image"),
    "segformer": ("segformer", "SegformerForImageClassification",
                  dict(CNN, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                       hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                       patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]), "image"),
    # audio
    "wav2vec2": ("wav2vec2", "Wav2Vec2ForSequenceClassification",
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, conv_dim=(8, 8), conv_stride=(5, 2),
                      conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4, classifier_proj_size=16, num_labels=3),
                 "audio"),
    "hubert": ("hubert", "HubertForSequenceClassification",
               dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, conv_dim=(8, 8), conv_stride=(5, 2),
                    conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=4, classifier_proj_size=16, num_labels=3),
               "audio"),
    "whisper": ("whisper", "WhisperForAudioClassification",
                dict(d_model=32, encoder_layers=2, encoder_attention_heads=4,
                     encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4,
                     decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=16,
                     classifier_proj_size=16, num_labels=3), "mel"),
    "ast": ("audio-spectrogram-transformer", "ASTForAudioClassification",
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, num_mel_bins=16, max_length=32, patch_size=8,
                 frequency_stride=8, time_stride=8, num_labels=3), "spectrogram"),
}


def inputs(kind: str, batch: int = 2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        return (torch.randint(2, V, (batch, 8), generator=g),)
    if kind == "image":
        return (torch.randn(batch, 3, 32, 32, generator=g),)
    if kind == "audio":
        return (torch.randn(batch, 1600, generator=g),)
    if kind == "mel":
        return (torch.randn(batch, 80, 32, generator=g),)
    if kind == "spectrogram":
        return (torch.randn(batch, 32, 16, generator=g),)
    raise ValueError(kind)


def build(name: str):
    """(model in eval mode, example inputs, input kind)."""
    import transformers

    model_type, cls_name, kwargs, kind = MODELS[name]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = getattr(transformers, cls_name)(config).eval()
    return model, inputs(kind), kind
