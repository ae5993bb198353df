"""Config pieces shared by the tests that build small random HF models."""

from __future__ import annotations

# DeepSeek-V3's multi-head latent attention at a small size: q and kv latents of 16, heads of
# 8 + 8 (rotary) query/key dims and 24 value dims, every key/value head its own; one dense
# layer, then 4 routed experts
DEEPSEEK_V3_MLA = dict(
    num_key_value_heads=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=24,
)

# Qwen3.5's Gated-DeltaNet linear attention at a small size: 2 key heads of 8, each shared by
# 2 value heads of 8; layer 0 linear, layer 1 full attention
QWEN3_5_DELTANET = dict(
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    layer_types=["linear_attention", "full_attention"],
)
# a Mamba2 mixer of 8 heads over one group of state of 8, in chunks of 4
MAMBA2_ONE_GROUP = dict(state_size=8, num_heads=8, n_groups=1, expand=2, chunk_size=4)

# Mixtral at a small size: 4 experts of 128 neurons over a hidden size of 64, top-2 routing
MIXTRAL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_local_experts=4,
    vocab_size=100,
)
