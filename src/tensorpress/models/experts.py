"""Mixture-of-experts blocks with their experts as linears.

``transformers`` keeps a block's experts fused, as two 3-D parameters (``gate_up_proj`` of shape
``(experts, 2 * inter, hidden)``, rows gate then up; ``down_proj`` of ``(experts, hidden,
inter)``), and its router as a bare ``weight``. Methods compress linears, so a loaded MoE model
is rewritten once (``split_experts``, called for every ``LoadedModel``): each expert becomes an
``ExpertMLP`` of three ``nn.Linear`` (``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``) and
the router keeps its own module but reads its weight from a linear child (``gate.proj``). The
forward passes compute exactly what the fused modules compute, with the same routing loop, so a
hook on an expert's linear sees the tokens routed to that expert and no others.
``fuse_experts`` writes the linears back into the fused layout ``transformers`` loads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from tensorpress.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class MoeLayout:
    """Where a family's MoE block keeps its parts, relative to a decoder block."""

    block: str = "mlp"  # the sparse MoE module
    router: str = "gate"  # relative to ``block``: the top-k router (a module with a ``weight``)
    experts: str = "experts"  # relative to ``block``: the fused experts
    shared: str | None = None  # relative to ``block``: an always-on expert MLP (gate/up/down_proj)
    shared_gate: str | None = None  # relative to ``block``: the linear gating the shared expert
    shared_first: bool = False  # whether the shared expert runs before the router

    def num_experts(self, config) -> int:
        for key in ("num_local_experts", "num_experts"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise UnsupportedArchitectureError(f"{config.model_type}: the config names no number of experts "
                                           "(num_local_experts or num_experts)")


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate_proj = gate
        self.up_proj = up
        self.down_proj = down


class ExpertLinears(nn.ModuleList):
    """A block's experts as a list of ``ExpertMLP``; called like the fused module, with the
    flattened hidden states and the router's top-k expert indices and weights."""

    def __init__(self, experts: list[ExpertMLP], act_fn: nn.Module, fused: nn.Module) -> None:
        super().__init__(experts)
        object.__setattr__(self, "act_fn", act_fn)  # parameterless; not a child, so the list holds experts only
        # the fused module on the meta device (no memory), to rebuild the layout transformers loads
        object.__setattr__(self, "_fused_template", fused)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.bincount(top_k_index.reshape(-1), minlength=len(self)).nonzero().flatten().tolist()
        for e in hit:
            if e >= len(self):
                continue
            top_k_pos, token_idx = torch.where((top_k_index == e).T)  # the fused loop's order
            expert = self[e]
            x = hidden_states[token_idx]
            h = self.act_fn(expert.gate_proj(x)) * expert.up_proj(x)
            y = expert.down_proj(h) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def fused(self) -> nn.Module:
        """The fused module ``transformers`` defines, holding these experts' (dense) weights."""
        module = copy.deepcopy(self._fused_template).to_empty(device=self[0].gate_proj.weight.device)
        with torch.no_grad():
            for e, expert in enumerate(self):
                gate, up, down = (_dense(getattr(expert, n)) for n in ("gate_proj", "up_proj", "down_proj"))
                module.gate_up_proj[e].copy_(torch.cat([gate, up], dim=0))
                module.down_proj[e].copy_(down)
        return module.to(module.gate_up_proj.dtype)


class RouterLinear(nn.Module):
    """The family's router module, unchanged, with its ``weight`` read from the linear child
    ``proj`` at each call (so that a recipe can compress the router like any linear)."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        weight = router.weight
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if weight.device.type != "meta":
                self.proj.weight.copy_(weight)
        del router.weight
        object.__setattr__(self, "_router", router)  # not a child: its weight is proj's

    def forward(self, hidden_states: torch.Tensor):
        router = self._router
        router.weight = self.proj.weight  # a plain attribute, set per call (proj may be compressed)
        try:
            return router(hidden_states)
        finally:
            del router.weight

    def restored(self) -> nn.Module:
        router = copy.deepcopy(self._router)
        router.weight = nn.Parameter(_dense(self.proj).detach().clone(), requires_grad=False)
        return router


def _dense(linear: nn.Module) -> torch.Tensor:
    weight = linear.weight
    return weight.detach().to(torch.float32 if weight.dtype == torch.float32 else weight.dtype)


def _check_fused(family: str, experts: nn.Module) -> None:
    """Refuse fused layouts other than concatenated gate|up, untransposed, without biases."""
    layout = {"is_concatenated": True, "is_transposed": False, "has_bias": False, "has_gate": True}
    wrong = {k: getattr(experts, k) for k, v in layout.items() if getattr(experts, k, v) != v}
    if wrong or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) or experts.gate_up_proj.dim() != 3:
        raise UnsupportedArchitectureError(
            f"{family}: experts stored as {type(experts).__name__} {wrong or ''} are not supported; tensorpress reads "
            "fused experts with gate_up_proj (experts, 2*inter, hidden) and down_proj (experts, hidden, inter), no biases")


def split_experts(blocks: nn.ModuleList, layout: MoeLayout, family: str) -> bool:
    """Rewrite every block's MoE module in place (experts as linears, router over a linear);
    idempotent. Returns whether anything was rewritten."""
    changed = False
    for i, block in enumerate(blocks):
        try:
            moe = block.get_submodule(layout.block)
        except AttributeError:
            continue
        if not hasattr(moe, layout.experts) or not hasattr(moe, layout.router):
            raise UnsupportedArchitectureError(
                f"{family}: block {i} has a dense FFN where other blocks have experts; models mixing dense and MoE "
                "blocks are not supported")
        experts = moe.get_submodule(layout.experts)
        if not isinstance(experts, ExpertLinears):
            _check_fused(family, experts)
            gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
            inter = down.shape[2]
            kwargs = {"bias": False, "device": gate_up.device, "dtype": gate_up.dtype}
            mlps = []
            for e in range(gate_up.shape[0]):
                linears = (nn.Linear(gate_up.shape[2], inter, **kwargs), nn.Linear(gate_up.shape[2], inter, **kwargs),
                           nn.Linear(inter, down.shape[1], **kwargs))
                if gate_up.device.type != "meta":
                    with torch.no_grad():
                        for linear, w in zip(linears, (gate_up[e, :inter], gate_up[e, inter:], down[e]), strict=True):
                            linear.weight.copy_(w)
                mlps.append(ExpertMLP(*linears))
            act_fn = experts.act_fn
            moe.set_submodule(layout.experts, ExpertLinears(mlps, act_fn, experts.to("meta")))
            changed = True
        router = moe.get_submodule(layout.router)
        if not isinstance(router, RouterLinear):
            moe.set_submodule(layout.router, RouterLinear(router))
            changed = True
    return changed


def fuse_experts(blocks: nn.ModuleList, layout: MoeLayout) -> None:
    """Undo ``split_experts`` in place: the fused layout ``transformers`` saves and loads, with
    each (possibly compressed) expert's dense weights."""
    for block in blocks:
        try:
            moe = block.get_submodule(layout.block)
        except AttributeError:
            continue
        experts = getattr(moe, layout.experts, None)
        if isinstance(experts, ExpertLinears):
            moe.set_submodule(layout.experts, experts.fused())
        router = getattr(moe, layout.router, None)
        if isinstance(router, RouterLinear):
            moe.set_submodule(layout.router, router.restored())
