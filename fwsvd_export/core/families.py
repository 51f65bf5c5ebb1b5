"""The model-family registry: per ``config.model_type``, the Linear layers worth factorizing by default
(attention and MLP projections, never embeddings or heads).

Adding a family is one entry in ``FAMILIES``. A family not listed gets every Linear but the task heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Family:
    targets: tuple[str, ...]  # regexes over module names
    exclude: tuple[str, ...] = field(default=())


_DECODER = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
_ENCODER = (
    r"encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)$"
)
HEADS = r"(^|\.)(lm_head|classifier|score|qa_outputs|pooler)(\.|$)"
ANY_FAMILY = Family((r".*",), (HEADS,))

FAMILIES: dict[str, Family] = {
    **{name: Family((_ENCODER,)) for name in ("bert", "roberta", "xlm-roberta", "electra")},
    "distilbert": Family((r"transformer\.layer\.\d+\.(attention\.(q_lin|k_lin|v_lin|out_lin)|ffn\.(lin1|lin2))$",)),
    "gpt2": Family((r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$",)),
    **{name: Family((_DECODER,)) for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "opt": Family((r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)$",)),
    "phi3": Family((r"layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))$",)),
}


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return FAMILIES.get(model_type, ANY_FAMILY) if isinstance(model_type, str) else ANY_FAMILY
