"""llama.cpp's file types as per-tensor type mixes (its ``llama-quant.cpp``, dense models).

A file type such as Q4_K_M is not one tensor type: llama.cpp gives every tensor a type by its
role, its block index and the model's shape, then falls back to a 32-weight type where a row is
not a multiple of 256 (``block_math.K_FALLBACK``). ``tensor_format`` is that choice, so a recipe
with ``file_type: q4_k_m`` quantizes each tensor onto the type llama.cpp's own quantizer would
give it and the two files compare at equal size. Checked against llama-cpp-python 0.3.36's
quantizer on SmolLM2-135M (every tensor's type equal; ``tests/io/test_llama_cpp_runtime.py``).

Roles are the adapter's (``attn_q``, ``attn_k``, ``attn_v``, ``attn_output``, ``ffn_gate``,
``ffn_up``, ``ffn_down``) plus ``token_embd`` and ``output``; ``tied``: the output is the token
table, which then takes the output's type.
"""

from __future__ import annotations

from typing import Literal

FileTypeName = Literal["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
                       "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]

BASE = {"q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0", "q2_k": "q2_k",
        "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k", "q4_k_m": "q4_k",
        "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}
_BLOCK = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32, "q2_k": 256, "q3_k": 256, "q4_k": 256,
          "q5_k": 256, "q6_k": 256}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the blocks that get a wider type in the _M mixes: the first and
    last eighth, and every third block between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_format(file_type: str, role: str, layer: int | None, n_layers: int, *, in_features: int,
                  n_gqa: int = 1, tied: bool = False) -> str:
    """The type llama.cpp gives a tensor of ``role`` in block ``layer`` of ``n_layers`` in a
    file of ``file_type``, before the fallback for rows that do not split into its blocks."""
    base = BASE[file_type]
    if role == "output" or (role == "token_embd" and tied):
        if in_features % _BLOCK[base] or base == "q8_0":
            return "q8_0"
        return "q6_k"
    if role == "token_embd":
        return base
    i, n = layer or 0, n_layers
    if role in ("attn_v", "attn_qkv"):  # llama.cpp treats a fused qkv as attn_v
        if file_type == "q2_k":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if file_type == "q3_k_m":
            return "q5_k" if i < 2 else "q4_k"
        if file_type == "q3_k_l":
            return "q5_k"
        if file_type in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return "q6_k"
        if file_type == "q4_k_s" and i < 4:
            return "q5_k"
        return base
    if role == "ffn_down":
        if file_type == "q2_k":
            return "q3_k"
        if file_type == "q3_k_m":
            return "q5_k" if i < n // 16 else "q4_k"
        if file_type == "q3_k_l":
            return "q5_k"
        if file_type in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return "q6_k"
        if file_type == "q4_k_s" and i < n // 8:
            return "q5_k"
        return base
    if role == "attn_output":
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(file_type, base)
    return base
