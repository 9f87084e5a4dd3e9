"""Named model presets: the architecture numbers of published models, as Hugging Face config kwargs.

Pure data. This module never imports torch or transformers; whoever builds a model passes
``preset.config`` to ``transformers.CONFIG_MAPPING[preset.model_type]``.

>>> p = get_preset("gpt3-1.3b")
>>> p.model_type, n_layers(p), p.config["n_embd"]
('gpt2', 24, 2048)
>>> describe(get_preset("llama-tiny"))["heads"]
4

``config`` dicts are shared: treat them as read-only and copy before changing anything
(``{**p.config, "n_positions": 4096}``). Keys are the ones the model's published ``config.json``
uses, flat (``rope_theta``, ``rotary_pct``), because Hugging Face config classes fill in nested
dicts such as ``rope_parameters`` in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_ds.errors import UserError, suggest
from hybrid_ds.config.families import FAMILIES, ConfigKeys

@dataclass(frozen=True)
class Preset:
    """One named architecture.

    ``published_params`` is the count the source publishes (the tests build the model on the meta
    device and require 2% agreement); ``None`` for the tiny debug presets, which match nothing.
    ``published_active`` is, for a Mixture-of-Experts model, the parameters one token uses (top-k experts).
    """

    name: str  # lowercase-with-dashes, e.g. "gpt3-1.3b"
    model_type: str  # Hugging Face model_type: a key of hybrid_ds.config.families.FAMILIES, or of GENERIC_TYPES
    config: dict  # kwargs for transformers.CONFIG_MAPPING[model_type]; read-only
    published_params: int | None  # parameter count the source publishes
    source: str  # where the numbers come from, one short line
    published_active: int | None = None  # Mixture-of-Experts: parameters per token the source publishes

    def __post_init__(self):
        # A bad entry in the table below is a bug in hybrid_ds, not a user mistake.
        if self.model_type not in FAMILIES and self.model_type not in GENERIC_TYPES:
            raise ValueError(f"preset {self.name}: {self.model_type!r} is not in the family table")

    @property
    def task(self) -> str:
        """"causal_lm" or "masked_lm": the family's (the generic adapter maps causal LMs only)."""
        return FAMILIES[self.model_type].task if self.model_type in FAMILIES else "causal_lm"


# Model types with presets but no family entry: the generic adapter (hybrid_ds/models/generic) maps them, and
# the estimator reads their structure on the meta device (torch) where a family's shape builder needs none.
GENERIC_TYPES = frozenset({"mixtral", "qwen3_moe"})

MILLION, BILLION = 10**6, 10**9  # the units the papers round to: "125M", "1.3B"


def _gpt2(name, n_layer, n_embd, n_head, published):
    # Radford et al. 2019, section 2.3: 1024-token context, 50257-token byte-level BPE, tied
    # input/output embeddings, learned positions, 4x MLP (GPT2Config's n_inner=None).
    config = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024, vocab_size=50257)
    source = f"Radford et al. 2019 (GPT-2); HF model card {name}"
    return Preset(name, "gpt2", config, published, source)


def _gpt3(name, n_layer, d_model, n_head, published, note=""):
    # Brown et al. 2020 trained every size with a 2048-token context and the GPT-2 tokenizer
    # (vocab 50257). Their alternating locally banded sparse attention has no parameters, so a
    # dense GPT-2 block gives the same count.
    source = "Brown et al. 2020 (GPT-3), Table 2.1" + (f"; {note}" if note else "")
    config = dict(n_layer=n_layer, n_embd=d_model, n_head=n_head, n_positions=2048,
                  vocab_size=50257)
    return Preset(name, "gpt2", config, published, source)


def _bert(name, layers, hidden, heads, published):
    # Devlin et al. 2019, section 3: L, H, A and a 4H feed-forward. The released config.json adds
    # what the paper rounds or leaves out: WordPiece vocab 30522, 512 positions, 2 segment types.
    config = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                  intermediate_size=4 * hidden, vocab_size=30522, max_position_embeddings=512,
                  type_vocab_size=2)
    source = "Devlin et al. 2019 (BERT), section 3; HF config.json"
    return Preset(name, "bert", config, published, source)


def _llama2(name, layers, hidden, heads, kv_heads, ffn, published):
    # Touvron et al. 2023 (Llama 2) Table 1 and the meta-llama/Llama-2-*-hf config.json files:
    # SentencePiece vocab 32000, 4096-token context, RMSNorm eps 1e-5, untied output head.
    config = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=32000,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    source = "Touvron et al. 2023 (Llama 2), Table 1; HF model card config.json"
    return Preset(name, "llama", config, published, source)


def _tiny(name, model_type, **config):
    # Debug presets: 64 wide, 4 heads of 16 (even, so rotary halves split cleanly), 128 positions,
    # a 256-512 token vocab. They build and run a forward on CPU in milliseconds.
    source = "hybrid_ds debug preset, not a published model"
    return Preset(name, model_type, config, None, source)


_ALL = [
    # GPT-2, Radford et al. 2019; the counts are the corrected ones in the openai/gpt-2 README and
    # the HF model cards (the paper's Table 2 said 117M/345M/762M/1542M). 1024 positions.
    _gpt2("gpt2", 12, 768, 12, 124 * MILLION),
    _gpt2("gpt2-medium", 24, 1024, 16, 355 * MILLION),
    _gpt2("gpt2-large", 36, 1280, 20, 774 * MILLION),
    _gpt2("gpt2-xl", 48, 1600, 25, 1558 * MILLION),
    # GPT-3, Table 2.1 rows: n_layers, d_model, n_heads (d_head = d_model / n_heads).
    _gpt3("gpt3-125m", 12, 768, 12, 125 * MILLION),
    _gpt3("gpt3-350m", 24, 1024, 16, 350 * MILLION),
    _gpt3("gpt3-760m", 24, 1536, 16, 760 * MILLION),
    # The table says 24 heads of 128 for d_model 2048, which does not multiply out; 16 x 128 = 2048
    # as in Megatron-LM's 1.3B config. Heads do not change the parameter count.
    _gpt3("gpt3-1.3b", 24, 2048, 16, 1300 * MILLION, "16 heads of 128, not the table's 24"),
    _gpt3("gpt3-2.7b", 32, 2560, 32, 2700 * MILLION),
    _gpt3("gpt3-6.7b", 32, 4096, 32, 6700 * MILLION),
    # The table's d_model 5140 is a typo: its 40 heads of d_head 128 give 5120.
    _gpt3("gpt3-13b", 40, 5120, 40, 13 * BILLION, "d_model 5120 = 40 x 128, not the table's 5140"),
    # Narayanan et al. 2021 count this exact shape as 174.6B; the table rounds to 175B.
    _gpt3("gpt3-175b", 96, 12288, 96, 175 * BILLION),
    # BERT, Devlin et al. 2019: BASE L=12 H=768 A=12 (110M), LARGE L=24 H=1024 A=16 (340M).
    _bert("bert-base", 12, 768, 12, 110 * MILLION),
    _bert("bert-large", 24, 1024, 16, 340 * MILLION),
    # Llama 2: the counts are the HF model cards' 6.74B, 13.0B, 69.0B (the paper says 7/13/70B).
    # Only 70B uses grouped-query attention (8 KV heads).
    _llama2("llama2-7b", 32, 4096, 32, 32, 11008, 6740 * MILLION),
    _llama2("llama2-13b", 40, 5120, 40, 40, 13824, 13 * BILLION),
    _llama2("llama2-70b", 80, 8192, 64, 8, 28672, 69 * BILLION),
    # Llama 3 8B, meta-llama/Meta-Llama-3-8B model card and config.json: GQA with 8 KV heads,
    # 128256-token tiktoken vocab (bos 128000, eos 128001), RoPE base 500000, 8192 context. 8.03B.
    Preset("llama3-8b", "llama", dict(
        num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001,
    ), 8030 * MILLION, "Meta Llama 3 8B model card; HF config.json"),
    # Mixtral 8x7B, mistralai/Mixtral-8x7B-v0.1 config.json: Mistral-7B's attention (GQA, 8 KV heads) with 8
    # SwiGLU experts of 14336 per layer, 2 per token. The Mistral AI announcement ("Mixtral of experts", Dec
    # 2023): "46.7B total parameters but only uses 12.9B parameters per token".
    Preset("mixtral-8x7b", "mixtral", dict(
        num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
        router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2,
    ), 46700 * MILLION, "Mistral AI, Mixtral of experts (2023); HF config.json", published_active=12900 * MILLION),
    # Qwen3-30B-A3B, Qwen/Qwen3-30B-A3B model card ("30.5B in total and 3.3B activated"; 48 layers, 32 query
    # and 4 KV heads, 128 experts, 8 activated) and config.json (head_dim 128, experts of 768, q/k norms).
    Preset("qwen3-30b-a3b", "qwen3_moe", dict(
        num_hidden_layers=48, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        router_aux_loss_coef=0.001, bos_token_id=151643, eos_token_id=151645,
    ), 30500 * MILLION, "Qwen3-30B-A3B model card; HF config.json", published_active=3300 * MILLION),
    # Tiny debug presets, one per family, each keeping the family's quirks.
    # gpt2: tied embeddings, learned positions; bos/eos moved to the last id as in GPT-2 (50256).
    # 2 layers, as in the STYLE.md example.
    _tiny("gpt2-tiny", "gpt2", n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=256,
          bos_token_id=255, eos_token_id=255),
    # bert: post-LN encoder, token types, tied MLM decoder plus its bias.
    _tiny("bert-tiny", "bert", num_hidden_layers=2, hidden_size=64,
          num_attention_heads=4, intermediate_size=256, vocab_size=512,
          max_position_embeddings=128, type_vocab_size=2),
    # llama: GQA (4 query heads share 2 KV heads), SwiGLU (ffn ~ 8/3 x 64, rounded to 16), untied.
    # 4 layers, so pipelines of 2 and 4 stages and uneven splits have something to cut.
    _tiny("llama-tiny", "llama", num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
          num_key_value_heads=2, intermediate_size=176, vocab_size=256,
          max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # mistral: GQA plus a sliding window (32) shorter than the context, so long inputs exercise it.
    _tiny("mistral-tiny", "mistral", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
          num_key_value_heads=2, intermediate_size=176, vocab_size=256,
          max_position_embeddings=128, sliding_window=32),
    # qwen2: biases on q/k/v only, GQA, tied embeddings as in Qwen2-0.5B.
    _tiny("qwen2-tiny", "qwen2", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
          num_key_value_heads=2, intermediate_size=176, vocab_size=256,
          max_position_embeddings=128, tie_word_embeddings=True),
    # gpt_neox: parallel attention + MLP residual, rotary on a quarter of each head (Pythia's
    # rotary_pct 0.25: 4 of 16 dims), untied.
    _tiny("gpt-neox-tiny", "gpt_neox", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
          intermediate_size=256, vocab_size=256, max_position_embeddings=128, rotary_pct=0.25),
    # opt: OPTConfig defaults (pre-LN, ReLU, learned positions offset by 2, tied); the projection
    # width word_embed_proj_dim must follow hidden_size or OPT adds project_in/out layers.
    _tiny("opt-tiny", "opt", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
          ffn_dim=256, word_embed_proj_dim=64, vocab_size=256, max_position_embeddings=128),
    # gemma: multi-query attention (1 KV head, as Gemma 2B), GeGLU, sqrt(hidden)-scaled tied
    # embeddings. GemmaConfig does not derive head_dim (default 256), so it is given.
    _tiny("gemma-tiny", "gemma", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
          num_key_value_heads=1, head_dim=16, intermediate_size=256, vocab_size=256,
          max_position_embeddings=128),
    # phi: parallel attention + MLP, rotary on half of each head (Phi-2: 8 of 16 dims), untied
    # output head with a bias.
    _tiny("phi-tiny", "phi", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
          intermediate_size=256, vocab_size=256, max_position_embeddings=128,
          partial_rotary_factor=0.5),
    # mixtral: every block an MoE layer of 4 SwiGLU experts, 2 per token, GQA; untied.
    _tiny("mixtral-tiny", "mixtral", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
          num_key_value_heads=2, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
          vocab_size=256, max_position_embeddings=128),
    # qwen3_moe: q/k norms, 4 experts narrower than the dense MLP (moe_intermediate_size), 2 per token,
    # and block 1 a dense MLP (mlp_only_layers), so blocks differ in size and in active parameters.
    _tiny("qwen3-moe-tiny", "qwen3_moe", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
          num_key_value_heads=2, head_dim=16, intermediate_size=176, moe_intermediate_size=64, num_experts=4,
          num_experts_per_tok=2, mlp_only_layers=[1], vocab_size=256, max_position_embeddings=128),
]


def _table(presets: list[Preset]) -> dict[str, Preset]:
    table: dict[str, Preset] = {}
    for p in presets:
        if p.name in table:
            raise ValueError(f"preset {p.name} defined twice")
        table[p.name] = p
    return table


PRESETS: dict[str, Preset] = _table(_ALL)


def is_preset(name: str) -> bool:
    return name in PRESETS


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or a UserError that suggests the closest names.

    >>> get_preset("gpt2-tiny").config["n_layer"]
    2
    """
    if name not in PRESETS:
        raise UserError("model.name", f"unknown preset {name!r}; {suggest(name, PRESETS)}")
    return PRESETS[name]


def n_layers(preset: Preset) -> int:
    """Transformer blocks in ``preset``, whatever its family calls the key.

    >>> n_layers(get_preset("llama2-70b"))
    80
    """
    return preset.config[_keys(preset).layers]


def _keys(preset: Preset) -> ConfigKeys:
    family = FAMILIES.get(preset.model_type)
    return family.keys if family else ConfigKeys("num_hidden_layers", "hidden_size", "num_attention_heads")


def describe(preset: Preset) -> dict:
    """A one-level summary for logs and the CLI; ``published`` is the source's rounded count.

    >>> describe(get_preset("gpt2"))  # doctest: +NORMALIZE_WHITESPACE
    {'name': 'gpt2', 'family': 'gpt2', 'layers': 12, 'hidden': 768, 'heads': 12,
     'published': 124000000}
    """
    keys = _keys(preset)
    return {
        "name": preset.name,
        "family": preset.model_type,
        "layers": preset.config[keys.layers],
        "hidden": preset.config[keys.hidden],
        "heads": preset.config[keys.heads],
        "published": preset.published_params,
    }
