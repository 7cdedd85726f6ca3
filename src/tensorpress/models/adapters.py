"""Per-architecture knowledge, as data.

An ``Adapter`` says where a family keeps its blocks, which linears a block holds (in execution
order, grouped by the input they share: q/k/v read the same activations), the final norm, and
whether the model is causal. Embeddings and the head are found through the standard
``get_input_embeddings`` / ``get_output_embeddings`` of ``transformers``. Methods never see an
adapter: the engine uses it to hand them linears and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from tensorpress.errors import UnsupportedArchitectureError
from tensorpress.models.experts import MoeLayout, split_experts

# roles of a mixture-of-experts block's linears (llama.cpp's tensor names, one linear per expert)
ROUTER_ROLES = ("ffn_gate_inp", "ffn_gate_inp_shexp")  # kept unless a stage's targets name them
EXPERT_ROLES = ("ffn_gate_exp", "ffn_up_exp", "ffn_down_exp")
SHARED_ROLES = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")


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
    # ffn_gate, ffn_up, ffn_down; ffn_gate_up: one linear whose rows are the gate's then the up's):
    # the file-type mixes choose tensor types by role, the structural methods find linears by it.
    roles: tuple[tuple[str, str], ...] = ()
    # Norm weights act as ``offset + weight``: 0 for plain norms, 1 for Gemma's RMSNorm, which
    # computes ``x_hat * (1 + w)`` (a scale folded into it must keep that form).
    norm_offset: float = 0.0
    norm_kind: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm: subtracts the mean, has a bias)
    # norms between a branch's output and the residual sum (Gemma 2/3's post-attention and
    # post-feedforward norms): the residual stream is not only read through the input norms
    post_norms: tuple[str, ...] = ()
    # whether the attention reads its head counts and head_dim from the config (so removing
    # whole heads is a config change a reload reproduces)
    head_config: bool = False
    # whether the model multiplies its embeddings by a factor derived from the hidden size
    # (Gemma: sqrt(hidden)), which changing that size would change
    scaled_embeddings: bool = False
    # a mixture-of-experts block's layout; ``linear_groups`` then lists the attention only until
    # ``bind`` adds the router, each expert and the shared expert for the model's expert count
    moe: MoeLayout | None = None
    num_experts: int = 0  # set by ``bind``
    # attention and FFN read one norm's output, their branches summed into the residual (Cohere;
    # StableLM and others when the config flag named here is true): ``bind`` then makes q/k/v and
    # the FFN's input linears one group (one input, one producer), so a scale folded into that
    # norm reaches every reader
    parallel: bool | str = False
    bound: bool = False  # set by ``bind``

    def bind(self, model: nn.Module) -> Adapter:
        """This adapter for one loaded model: its groups as the model's config lays them out
        (parallel attention and FFN share one group); a mixture-of-experts model's experts become
        linears (``models/experts.py``, in place) and the groups name each of them, in execution
        order. Idempotent."""
        if self.moe is not None:
            split_experts(self.blocks(model), self.moe, self.family)
        if self.bound:
            return self
        config = model.config.get_text_config()
        parallel = self.parallel if isinstance(self.parallel, bool) else bool(getattr(config, self.parallel, False))
        if parallel:  # groups (q, k, v), (o), (gate, up), (down) -> (q, k, v, gate, up), (o), (down)
            groups, producers = list(self.linear_groups), list(self.producers)
            groups[0] = groups[0] + groups.pop(2)
            producers.pop(2)
            return replace(self, linear_groups=tuple(groups), producers=tuple(producers), bound=True)
        if self.moe is None:
            return replace(self, bound=True)
        n = self.moe.num_experts(config)
        base = self.moe.block
        groups: list[tuple[str, ...]] = []
        producers: list[str | None] = []
        roles: list[tuple[str, str]] = []

        def add(names: tuple[str, ...], producer: str | None, kinds: tuple[str, ...]) -> None:
            groups.append(names)
            producers.append(producer)
            roles.extend(zip(names, kinds, strict=True))

        def shared() -> None:
            s = f"{base}.{self.moe.shared}"
            add((f"{s}.gate_proj", f"{s}.up_proj"), None, SHARED_ROLES[:2])
            add((f"{s}.down_proj",), f"{s}.up_proj", SHARED_ROLES[2:])

        if self.moe.shared and self.moe.shared_first:
            shared()
        # every expert reads the FFN norm's output too (its routed rows): no scale can be folded
        # into that norm for one group alone, so the router and the gate/up groups have no producer
        add((f"{base}.{self.moe.router}.proj",), None, ROUTER_ROLES[:1])
        for e in range(n):
            x = f"{base}.{self.moe.experts}.{e}"
            add((f"{x}.gate_proj", f"{x}.up_proj"), None, EXPERT_ROLES[:2])
            add((f"{x}.down_proj",), f"{x}.up_proj", EXPERT_ROLES[2:])
        if self.moe.shared and not self.moe.shared_first:
            shared()
        if self.moe.shared_gate:
            add((f"{base}.{self.moe.shared_gate}",), None, ROUTER_ROLES[1:])
        return replace(self, linear_groups=self.linear_groups + tuple(groups), producers=self.producers + tuple(producers),
                       roles=self.roles + tuple(roles), num_experts=n, bound=True)

    def expert_of(self, relative_name: str) -> int | None:
        """The expert a block linear belongs to, or None (attention, router, shared expert)."""
        if self.moe is None or self.role_of(relative_name) not in EXPERT_ROLES:
            return None
        return int(relative_name.removeprefix(f"{self.moe.block}.{self.moe.experts}.").split(".")[0])

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

    def linears_with(self, *roles: str) -> list[str]:
        """A block's linears of the given roles, in execution order."""
        by_name = dict(self.roles)
        return [name for name in self.block_linears() if by_name.get(name) in roles]

    def input_norm(self, role: str) -> str | None:
        """The norm (or linear) whose output the linears of ``role`` read: the producer of
        their group, None where none can take a fold."""
        names = self.linears_with(role)
        return self.producer_of(self.group_of(names[0])) if names else None

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

_LLAMA_ROLES = (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"))



def _llama_layout(family: str, model_types: tuple[str, ...], producers: tuple[str | None, ...], **facts) -> Adapter:
    """An adapter for a family with Llama's module layout (``model.layers``, q/k/v, o, gate/up,
    down, ``model.norm``); ``facts`` are its norms, heads and embeddings."""
    return Adapter(family=family, model_types=model_types, base_paths=("model",), blocks_paths=("model.layers",),
                   final_norm_paths=("model.norm",), linear_groups=_LLAMA_GROUPS, producers=producers,
                   roles=_LLAMA_ROLES, **facts)


def _moe_layout(family: str, model_types: tuple[str, ...], moe: MoeLayout, **facts) -> Adapter:
    """An adapter for a mixture-of-experts family with Llama's attention and norms; its FFN
    groups come from ``Adapter.bind``."""
    return Adapter(family=family, model_types=model_types, base_paths=("model",), blocks_paths=("model.layers",),
                   final_norm_paths=("model.norm",), linear_groups=_LLAMA_GROUPS[:2],
                   producers=("input_layernorm", "self_attn.v_proj"), roles=_LLAMA_ROLES[:4], moe=moe, **facts)


ADAPTERS: tuple[Adapter, ...] = (
    # o_proj's inputs are v_proj's outputs only when every query head has its own KV head; the
    # engine checks the widths before folding there. Granite: scalar multipliers in the config.
    _llama_layout("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite"),
                  ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"), head_config=True),
    # Gemma: Llama's layout, RMSNorm weights as (1 + w), embeddings scaled by sqrt(hidden)
    _llama_layout("gemma", ("gemma",), ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"),
                  norm_offset=1.0, head_config=True, scaled_embeddings=True),
    # Gemma 2 and 3: four norms per block (post_attention_layernorm normalises the attention output
    # before the residual sum; the FFN's input norm is pre_feedforward_layernorm), q/k norms
    # (Gemma 3), sliding-window and global layers (config.layer_types)
    _llama_layout("gemma2", ("gemma2", "gemma3_text"),
                  ("input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj"), norm_offset=1.0,
                  post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), head_config=True,
                  scaled_embeddings=True),
    # OLMo 2: norms after each branch only, none before: no producer for the q/k/v or gate/up
    # inputs; q/k norms over the whole projection (not per head), so heads are not removed by config
    _llama_layout("olmo2", ("olmo2",), (None, "self_attn.v_proj", None, "mlp.up_proj"),
                  post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    # Mixtral, Qwen3-MoE: top-k experts in every block; OLMoE: the same with q/k norms over the
    # whole projection (as OLMo 2, so heads are not removed by config); Qwen2-MoE: also a shared
    # expert, run first, whose output a sigmoid gate scales
    _moe_layout("mixtral", ("mixtral", "qwen3_moe"), MoeLayout(), head_config=True),
    _moe_layout("olmoe", ("olmoe",), MoeLayout()),
    _moe_layout("qwen2_moe", ("qwen2_moe",), MoeLayout(shared="shared_expert", shared_gate="shared_expert_gate",
                                                       shared_first=True), head_config=True),
    # Cohere (Command-R): attention and FFN in parallel from one mean-subtracting norm without
    # bias; logits scaled by config.logit_scale; heads not removed by config (the optional
    # q/k norms hold one weight row per head)
    Adapter(family="cohere", model_types=("cohere",), base_paths=("model",), blocks_paths=("model.layers",),
            final_norm_paths=("model.norm",), linear_groups=_LLAMA_GROUPS, roles=_LLAMA_ROLES,
            producers=("input_layernorm", "self_attn.v_proj", None, "mlp.up_proj"), norm_kind="layer", parallel=True),
    # StableLM: LayerNorms with biases; parallel attention and FFN from input_layernorm when
    # config.use_parallel_residual (then there is no post_attention_layernorm)
    Adapter(family="stablelm", model_types=("stablelm",), base_paths=("model",), blocks_paths=("model.layers",),
            final_norm_paths=("model.norm",), linear_groups=_LLAMA_GROUPS, roles=_LLAMA_ROLES,
            producers=("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"),
            norm_kind="layer", parallel="use_parallel_residual"),
    Adapter(
        # Phi-3 / Phi-4: one linear for q|k|v and one for gate|up (its rows: the gate's, then the up's)
        family="phi3",
        model_types=("phi3",),
        base_paths=("model",),
        blocks_paths=("model.layers",),
        final_norm_paths=("model.norm",),
        linear_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        # o_proj reads the attention output, down_proj up * act(gate): neither is one producer's rows
        producers=("input_layernorm", None, "post_attention_layernorm", None),
        roles=(("self_attn.qkv_proj", "attn_qkv"), ("self_attn.o_proj", "attn_output"),
               ("mlp.gate_up_proj", "ffn_gate_up"), ("mlp.down_proj", "ffn_down")),
        head_config=True,
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
        norm_kind="layer",
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
        norm_kind="layer",
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
        norm_kind="layer",
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
        norm_kind="layer",
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
