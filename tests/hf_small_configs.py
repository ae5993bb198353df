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
