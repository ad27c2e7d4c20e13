"""The real model families, built small with random weights (seed 0), shared by the tests."""
import torch


def tiny_clip():
    import open_clip
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=2),
    )


def tiny_vit():
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, num_classes=5)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def tiny_phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    cfg = Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=64, max_position_embeddings=32, pad_token_id=0)
    return Phi3ForCausalLM(cfg)


VIT_TARGETS = ["qkv", "fc1", "fc2"]


def budget_vit():
    """The budget tests' ViT: width 64, depth 4, 32 px (the tiny ViT of configs/model/tiny_vit.yaml's shapes)."""
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                             num_classes=0)
