"""Configuration of an lrkv model exported for Hugging Face transformers (remote code).

This file is copied into every exported folder and loaded with `trust_remote_code=True`; it imports
only transformers, never lrkv. Field names follow transformers where one exists (hidden_size,
num_hidden_layers, ...); the rest are lrkv's model choices:

    attention_kind     mha | gqa | mqa | mla | lrkv | compressed_kv
    hidden_act         relu2 | gelu | silu | swiglu (MLP of width intermediate_size)
    norm_affine        RMSNorm with learned weights (False: weightless norms)
    embed_norm         RMSNorm right after the token embedding
    qk_norm            RMSNorm of each query/key head before RoPE (not used by mla)
    logit_softcap      logits = cap * tanh(z / cap); None disables
    kv_latent, q_latent, rope_dim       mla: d_c, query latent (0 = full-rank queries), decoupled RoPE dim d_r
    rank, residual_rope                 lrkv: r per head; False = decoupled variant (position-free residual)
    k_ranks, v_ranks                    compressed_kv: per-layer ranks of the key and value projections
"""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig


class LrkvConfig(PreTrainedConfig):
    model_type = "lrkv"

    def __init__(
        self,
        attention_kind="mha",
        vocab_size=50304,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=6,
        head_dim=128,
        num_key_value_heads=None,
        intermediate_size=3072,
        hidden_act="relu2",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        norm_affine=False,
        embed_norm=True,
        qk_norm=True,
        rope_theta=10000.0,
        logit_softcap=15.0,
        tie_word_embeddings=False,
        kv_latent=None,
        q_latent=0,
        rope_dim=None,
        rank=None,
        residual_rope=True,
        k_ranks=None,
        v_ranks=None,
        use_cache=True,
        **kwargs,
    ):
        self.attention_kind = attention_kind
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.norm_affine = norm_affine
        self.embed_norm = embed_norm
        self.qk_norm = qk_norm
        self.rope_theta = rope_theta
        self.logit_softcap = logit_softcap
        self.kv_latent = kv_latent
        self.q_latent = q_latent
        self.rope_dim = rope_dim
        self.rank = rank
        self.residual_rope = residual_rope
        self.k_ranks = k_ranks
        self.v_ranks = v_ranks
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
