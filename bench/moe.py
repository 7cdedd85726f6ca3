"""Mixture-of-experts statistics policies, protocol P1 (see ../shared/data/README.md).

No mixture-of-experts checkpoint is available offline, so the subject is built by *sparse
upcycling* (Komatsuzaki et al., 2022): SmolLM2-135M with every block's MLP copied into
``--experts`` experts (Mixtral layout, top-2, renormalised weights) and a router of random
Gaussian rows, seeded. The experts are equal, so the upcycled model computes the dense model's
function exactly (its perplexity is the baseline's: a check printed below), while the router
spreads tokens unevenly as an untrained one does. With few calibration windows, many experts see
fewer tokens than their input width: the policies differ exactly there.

Rows: RTN (no statistics), then the GPTQ stage under each policy: ``routed`` (every expert's own
tokens, however few: ``min_tokens 0``; the default ``min_tokens 1`` differs only for experts no
token reached), and with ``min_tokens None`` (starved: below the input width) ``weighted`` and
``rtn``. Quality on the P1
evaluation windows, never on calibration data.

    .venv/bin/python bench/moe.py [--experts 8] [--samples 4] [--bits 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers as T
from rich.console import Console
from rich.table import Table

import tensorpress as tp
from tensorpress.models import LoadedModel, adapter_for

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent / "../shared/data/wikitext2-valid.txt"
console = Console(width=None if sys.stdout.isatty() else 140)


def upcycle(dense: LoadedModel, experts: int, seed: int) -> LoadedModel:
    """``dense`` (a Llama-layout model) as a Mixtral of ``experts`` copies of each MLP."""
    c = dense.model.config
    config = T.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, num_local_experts=experts, num_experts_per_tok=2,
        hidden_act=c.hidden_act, sliding_window=None)
    model = T.MixtralForCausalLM(config).eval()
    state = dense.model.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if ".mlp.gate.weight" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=g) / tensor.shape[1] ** 0.5)
            elif ".mlp.experts.gate_up_proj" in name:
                prefix = name.removesuffix("experts.gate_up_proj")
                tensor.copy_(torch.cat([state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"]])[None].expand_as(tensor))
            elif ".mlp.experts.down_proj" in name:
                tensor.copy_(state[name.removesuffix("experts.down_proj") + "down_proj.weight"][None].expand_as(tensor))
            else:
                tensor.copy_(state[name])
    return LoadedModel(model, dense.tokenizer, adapter_for("mixtral"), f"{dense.spec} upcycled to {experts} experts",
                       {"base_model": dense.spec})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="calibration windows of 512 tokens (few: starved experts)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=HERE / "results" / "moe-policies.json")
    args = p.parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    dense = tp.load_model(args.model)
    lm = upcycle(dense, args.experts, args.seed)
    windows = tp.data.evaluation(lm, args.data.resolve(), seq_len=512, windows=args.windows)
    calib = tp.data.calibration(lm, source=args.data.resolve(), samples=args.samples, seq_len=512, seed=args.seed)
    stage = {"bits": args.bits, "group_size": 128}
    rows = []
    base = tp.evaluate(dense, reference=None, data=windows)
    rows.append({"row": f"{args.model} (dense)", "perplexity": base.perplexity})
    upcycled = tp.evaluate(lm, reference=None, data=windows)
    rows.append({"row": f"upcycled, {args.experts} experts (uncompressed)", "perplexity": upcycled.perplexity})
    console.print(f"dense ppl {base.perplexity:.4f}, upcycled {upcycled.perplexity:.4f} (equal experts: the same function)")
    cache: dict = {}  # the upcycled model's outputs, computed once
    runs = [("rtn", {"method": "rtn", **stage}, {}),
            ("gptq, routed tokens only", {"method": "gptq", **stage}, {"min_tokens": 0}),
            ("gptq, weighted for starved", {"method": "gptq", **stage}, {"min_tokens": None}),
            ("gptq, rtn for starved", {"method": "gptq", **stage}, {"min_tokens": None, "few_tokens": "rtn"})]
    for label, method, policy in runs:
        start = time.perf_counter()
        result = tp.compress(lm, tp.Recipe(stages=[method], experts=policy), calib)
        seconds = time.perf_counter() - start
        report = tp.evaluate(result, reference=lm, data=windows, reference_cache=cache)
        tokens = [n for per_block in result.expert_tokens.values() for n in per_block]
        starved = sum(n < lm.model.config.hidden_size for n in tokens)
        rows.append({"row": label, "perplexity": report.perplexity, "kl": report.kl, "top1": report.top1_agreement,
                     "bits_per_weight": result.bits_per_weight, "seconds": seconds,
                     "starved_experts": f"{starved}/{len(tokens)}" if tokens else "-",
                     "tokens_min_median_max": sorted(tokens)[:: max(1, len(tokens) // 2)] if tokens else None})
        console.print(rows[-1])
    table = Table(title=f"MoE statistics policies: {args.model} upcycled to {args.experts} experts (top-2), "
                        f"w{args.bits}g128, {args.samples} x 512 calibration tokens")
    for col in ("row", "perplexity", "KL", "top-1", "bits/weight", "s", "starved experts"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        table.add_row(r["row"], f"{r['perplexity']:.3f}", f"{r['kl']:.4f}" if "kl" in r else "-",
                      f"{r['top1']:.2%}" if "top1" in r else "-", f"{r['bits_per_weight']:.3f}" if "kl" in r else "-",
                      f"{r['seconds']:.0f}" if "seconds" in r else "-", r.get("starved_experts", "-"))
    console.print(table)
    console.print(f"protocol P1: {args.data.name}, {windows.samples} x 512 evaluation windows ({windows.note}); calibration "
                  f"{args.samples} x 512 from the first 60 %, seed {args.seed}; starved: fewer routed tokens than the "
                  f"hidden size {lm.model.config.hidden_size}")
    machine = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                                    "machine": machine, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()}},
                                   indent=1) + "\n", encoding="utf-8")
    console.print(f"command: {command}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
