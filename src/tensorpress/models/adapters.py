"""Per-architecture knowledge, as data.

An ``Adapter`` says where a family keeps its blocks, which linears a block holds (in execution
order, grouped by the input they share: q/k/v read the same activations), the final norm, and
whether the model is causal. Embeddings and the head are found through the standard
``get_input_embeddings`` / ``get_output_embeddings`` of ``transformers``. Methods never see an
adapter: the engine uses it to hand them linears and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tensorpress.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    # Dotted paths, tried in order, relative to the loaded model (a task head such as
    # ``LlamaForCausalLM`` or a bare base model such as ``BertModel``).
    base_paths: tuple[str, ...]  # the module that runs embeddings + blocks (+ final norm)
    blocks_paths: tuple[str, ...]  # the ModuleList of blocks
    final_norm_paths: tuple[str, ...]  # empty when the family has none (post-norm BERT)
    # Linears of one block, relative to the block, in execution order; an inner tuple is a
    # group of linears that read the same input. Contract: the last group's outputs feed only
    # the block's output (the engine skips their matmul in statistics-only passes).
    linear_groups: tuple[tuple[str, ...], ...]
    causal: bool = True
    # For each linear group, the module whose output is the group's input and into which a
    # per-input-channel scale can be folded exactly (a norm: weight and bias; a linear: its
    # output rows), or None where no such module exists (a nonlinearity or a fused projection
    # sits between). Used by activation-aware scaling (AWQ).
    producers: tuple[str | None, ...] = ()
    # What each block linear is, in llama.cpp's terms (attn_q, attn_k, attn_v, attn_qkv, attn_output,
    # ffn_gate, ffn_up, ffn_down): the file-type mixes choose tensor types by role.
    roles: tuple[tuple[str, str], ...] = ()

    def producer_of(self, group: int) -> str | None:
        return self.producers[group] if group < len(self.producers) else None

    def _resolve(self, model: nn.Module, paths: tuple[str, ...], what: str) -> tuple[str, nn.Module]:
        for path in paths:
            try:
                return path, model.get_submodule(path) if path else model
            except AttributeError:
                continue
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has none of the {what} paths {list(paths)} that the "
            f"{self.family!r} adapter expects"
        )

    def base(self, model: nn.Module) -> nn.Module:
        return self._resolve(model, self.base_paths, "base model")[1]

    def blocks_path(self, model: nn.Module) -> str:
        return self._resolve(model, self.blocks_paths, "block list")[0]

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = self._resolve(model, self.blocks_paths, "block list")[1]
        assert isinstance(blocks, nn.ModuleList)
        return blocks

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        if not self.final_norm_paths:
            return None
        return self._resolve(model, self.final_norm_paths, "final norm")[1]

    def block_linears(self) -> list[str]:
        """Names of a block's linears relative to the block, in execution order."""
        return [name for group in self.linear_groups for name in group]

    def role_of(self, relative_name: str) -> str | None:
        return dict(self.roles).get(relative_name)

    def group_of(self, relative_name: str) -> int:
        for i, group in enumerate(self.linear_groups):
            if relative_name in group:
                return i
        raise KeyError(relative_name)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        base_paths=("model",),
        blocks_paths=("model.layers",),
        final_norm_paths=("model.norm",),
        linear_groups=_LLAMA_GROUPS,
        # o_proj's inputs are v_proj's outputs only when every query head has its own KV head;
        # the engine checks the widths before folding there.
        producers=("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"),
        roles=(("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
               ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
               ("mlp.down_proj", "ffn_down")),
    ),
    Adapter(
        family="gpt2",
        model_types=("gpt2",),
        base_paths=("transformer", ""),
        blocks_paths=("transformer.h", "h"),
        final_norm_paths=("transformer.ln_f", "ln_f"),
        # c_attn computes q, k and v in one matmul; c_proj of attn reads the attention output.
        linear_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        producers=("ln_1", None, "ln_2", None),
        roles=(("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"),
               ("mlp.c_proj", "ffn_down")),
    ),
    Adapter(
        family="opt",
        model_types=("opt",),
        base_paths=("model", ""),
        blocks_paths=("model.decoder.layers", "decoder.layers"),
        final_norm_paths=("model.decoder.final_layer_norm", "decoder.final_layer_norm"),
        linear_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        producers=("self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", None),
        roles=(("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
               ("self_attn.out_proj", "attn_output"), ("fc1", "ffn_up"), ("fc2", "ffn_down")),
    ),
    Adapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        base_paths=("gpt_neox", ""),
        blocks_paths=("gpt_neox.layers", "layers"),
        final_norm_paths=("gpt_neox.final_layer_norm", "final_layer_norm"),
        linear_groups=(
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        producers=("input_layernorm", None, "post_attention_layernorm", None),
        roles=(("attention.query_key_value", "attn_qkv"), ("attention.dense", "attn_output"),
               ("mlp.dense_h_to_4h", "ffn_up"), ("mlp.dense_4h_to_h", "ffn_down")),
    ),
    Adapter(
        family="bert",
        model_types=("bert",),
        base_paths=("bert", ""),
        blocks_paths=("bert.encoder.layer", "encoder.layer"),
        # BERT normalises at the end of each block: there is no separate final norm.
        final_norm_paths=(),
        linear_groups=(
            ("attention.self.query", "attention.self.key", "attention.self.value"),
            ("attention.output.dense",),
            ("intermediate.dense",),
            ("output.dense",),
        ),
        causal=False,
        roles=(("attention.self.query", "attn_q"), ("attention.self.key", "attn_k"), ("attention.self.value", "attn_v"),
               ("attention.output.dense", "attn_output"), ("intermediate.dense", "ffn_up"), ("output.dense", "ffn_down")),
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a ``config.model_type``; an error listing what is supported otherwise."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; supported model types: "
        f"{', '.join(supported_model_types())}"
    )
