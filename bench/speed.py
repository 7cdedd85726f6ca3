"""Speed benchmark: prefill and decode throughput of a model as loaded, in bf16, and quantized
with the packed int8 / int4 kernels or the dense-dequantization path.

Structurally pruned configurations (drop-*, ffn-*, heads-*, slice-*) are calibrated on 64 windows of protocol P1;
the others need no calibration. Each configuration runs in its own process (so peak RSS is its own): load, prepare, warm up,
then ``--runs`` timed runs of a prefill (one forward over ``--prefill`` tokens) and a greedy
decode (batch 1, ``--decode`` new tokens after a 32-token prompt). Medians are reported; ratios
to fp32 are computed from medians measured in the same invocation.

With ``--interleave`` every configuration is built in one process and timed in rounds (each round
runs each configuration once), and a ratio to fp32 is the median of the per-round ratios: on a
shared, drifting machine this resolves differences of a few percent that configurations timed
minutes apart cannot (the price: no per-configuration peak RSS).

    .venv/bin/python bench/speed.py                      # all configurations on smollm2-135m
    .venv/bin/python bench/speed.py --config int4-packed # one of them
    .venv/bin/python bench/speed.py --interleave --config fp32 --config ffn-10% --config slice-20%
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIGS = {
    # name: (recipe or None, dtype, packed kernels: False, or the backend of packed_kernels)
    "fp32": (None, "float32", False),
    "bf16": (None, "bfloat16", False),
    "int8-packed": ("rtn-w8", "float32", "auto"),  # our kernel (8-bit codes as stored)
    "int8-packed-torch": ("rtn-w8", "float32", "torch"),  # torch's op, bf16 activations
    "int4-dequant": ("rtn-w4g128", "float32", False),
    "int4-packed": ("rtn-w4g128", "float32", "auto"),  # our AVX2 kernel where it runs
    "int4-packed-torch": ("rtn-w4g128", "float32", "torch"),  # torch's op, bf16 activations
    "int4-packed-head8": ("rtn-w4g128-head8", "float32", "auto"),  # the LM head in 8 bits
    "int4-packed-head": ("rtn-w4g128-head", "float32", "auto"),  # the LM head in 4 bits too
    "svd-30%": ("svd-p30", "float32", False),  # low-rank parts: two thin matmuls per linear
    # structurally pruned: ordinary smaller models (calibrated on P1's calibration windows)
    "drop-2": ("drop-blocks-2", "float32", False),
    "drop-4": ("drop-blocks-4", "float32", False),
    "drop-6": ("drop-blocks-6", "float32", False),
    "drop-4-linear": ("drop-blocks-4-linear", "float32", False),  # a fitted linear map per removed run (not a plain model)
    "ffn-10%": ("prune-ffn-10", "float32", False),
    "ffn-20%": ("prune-ffn-20", "float32", False),
    "ffn-30%": ("prune-ffn-30", "float32", False),
    "heads-33%": ("prune-heads-33", "float32", False),
    "slice-10%": ("slicegpt-10", "float32", False),
    "slice-20%": ("slicegpt-20", "float32", False),
    "slice-25%": ("slicegpt-25", "float32", False),
}
DATA = HERE.parent.parent / "shared" / "data" / "wikitext2-valid.txt"


def build(args: argparse.Namespace, name: str):
    """The configuration's model, ready to time: loaded, compressed if it has a recipe, cast."""
    import tensorpress as tp
    from tensorpress.progress import progress_bars

    recipe, dtype, _ = CONFIGS[name]
    lm = tp.load_model(args.model)
    model = lm.model
    if recipe:
        rec = tp.recipes.get(recipe)
        calib = None
        if rec.needs_calibration:  # protocol P1's calibration windows: first 60 % of the shared text
            calib = tp.data.calibration(lm, source=DATA, samples=64, seq_len=512, seed=0)
        with progress_bars(False):
            model = tp.compress(lm, rec, calib, inplace=True).model.model
    return model.to(getattr(torch, dtype)).eval()


def inputs(args: argparse.Namespace, model) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill tokens and the decode prompt: random token ids, seeded (same for every config)."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (1, args.prefill), generator=gen), torch.randint(0, vocab, (1, 32), generator=gen)


@contextlib.contextmanager
def running(name: str) -> Iterator[None]:
    """Inference mode with the configuration's packed kernels on or off."""
    from tensorpress.parts.kernels import packed_kernels

    packed = CONFIGS[name][2]
    with torch.inference_mode(), packed_kernels(bool(packed), backend=packed or "auto"):
        yield


def warm_up(args: argparse.Namespace, name: str, model) -> None:
    """A short prefill and decode (kernel packing happens here), not timed."""
    prefill_ids, prompt = inputs(args, model)
    with running(name):
        model(input_ids=prefill_ids[:, :64])
        model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)


def time_once(args: argparse.Namespace, name: str, model) -> tuple[float, float]:
    """Seconds of one prefill (``--prefill`` tokens) and one greedy decode (batch 1)."""
    prefill_ids, prompt = inputs(args, model)
    with running(name):
        t = time.perf_counter()
        model(input_ids=prefill_ids, use_cache=False)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.decode,
                             min_new_tokens=args.decode, do_sample=False, pad_token_id=0)
        decode = time.perf_counter() - t
        assert out.shape[1] == 32 + args.decode
    return prefill, decode


def row(args: argparse.Namespace, name: str, model, prefill_s: list[float], decode_s: list[float], rss: float | None) -> dict:
    recipe, dtype, packed = CONFIGS[name]
    return {
        "config": name, "recipe": recipe, "dtype": dtype, "packed_kernels": packed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prefill_tokens_per_s": args.prefill / statistics.median(prefill_s),
        "decode_tokens_per_s": args.decode / statistics.median(decode_s),
        "prefill_seconds": prefill_s, "decode_seconds": decode_s,
        "peak_rss_mib": rss,
    }


def measure(args: argparse.Namespace, name: str) -> dict:
    """One configuration alone in this process: warm-up, then ``--runs`` timed runs."""
    model = build(args, name)
    warm_up(args, name, model)
    times = [time_once(args, name, model) for _ in range(args.runs)]
    return row(args, name, model, [t[0] for t in times], [t[1] for t in times],
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def interleaved(args: argparse.Namespace, names: list[str]) -> list[dict]:
    """Every configuration in this process, timed in rounds: each round runs each configuration
    once (the order rotated every round), so a slow spell of a shared machine hits all of them
    alike; a ratio to fp32 is then the median of the per-round ratios (pairs measured minutes
    apart would carry the drift). Peak RSS is the whole process's, so it is not per config."""
    models = {}
    for name in names:
        print(f"building {name} ...", file=sys.stderr, flush=True)
        models[name] = build(args, name)
        warm_up(args, name, models[name])
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(args.runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(time_once(args, name, models[name]))
        print(f"  round {r + 1}/{args.runs} done", file=sys.stderr, flush=True)
    rows = [row(args, n, models[n], [t[0] for t in times[n]], [t[1] for t in times[n]], None) for n in names]
    if "fp32" in times:
        for r in rows:
            pairs = list(zip(times[r["config"]], times["fp32"], strict=True))
            r["prefill_vs_fp32_paired"] = statistics.median(b[0] / a[0] for a, b in pairs)
            r["decode_vs_fp32_paired"] = statistics.median(b[1] / a[1] for a, b in pairs)
    return rows


def separate(args: argparse.Namespace, name: str) -> dict:
    """One configuration in its own process (so its peak RSS is its own)."""
    cmd = [sys.executable, __file__, "--child", "--config", name, "--model", args.model, "--runs", str(args.runs),
           "--prefill", str(args.prefill), "--decode", str(args.decode)]
    print(f"measuring {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    # as soon as it is measured: a slow configuration should not hide the others
    print(f"  {name}: prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode {r['decode_tokens_per_s']:.1f} tok/s, "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--config", choices=list(CONFIGS), action="append", help="default: all")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--out", type=Path, default=HERE / "results" / "speed.json")
    p.add_argument("--interleave", action="store_true",
                   help="all configurations in one process, timed in rounds (drift-resistant ratios; no per-config peak RSS)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.config[0])))
        return 0
    names = args.config or list(CONFIGS)
    load = [round(x, 2) for x in os.getloadavg()]
    rows = interleaved(args, names) if args.interleave else [separate(args, name) for name in names]
    base = next((r for r in rows if r["config"] == "fp32"), None)
    print(f"{args.model}: prefill {args.prefill} tokens, decode batch 1 x {args.decode} new tokens, median of {args.runs} runs")
    paired = args.interleave and base is not None
    how = "median of per-round ratios (interleaved rounds)" if paired else "ratio of medians"
    print(f"{'config':<14}{'params':>12}{'prefill tok/s':>14}{'x fp32':>8}{'decode tok/s':>14}{'x fp32':>8}{'peak RSS MiB':>14}   (x fp32: {how})")
    for r in rows:
        if paired:
            rp, rd = r["prefill_vs_fp32_paired"], r["decode_vs_fp32_paired"]
        else:
            rp = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"] if base else float("nan")
            rd = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else float("nan")
        r["prefill_vs_fp32"], r["decode_vs_fp32"] = rp, rd
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] is not None else "-"
        print(f"{r['config']:<14}{r['parameters']:>12,}{r['prefill_tokens_per_s']:>14.1f}{rp:>8.2f}{r['decode_tokens_per_s']:>14.1f}"
              f"{rd:>8.2f}{rss:>14}")
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "load_avg_at_start": load,
               "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"command: {shlex.join([sys.executable, *sys.argv])}\nmachine: {machine}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "protocol": {"prefill_tokens": args.prefill, "decode_tokens": args.decode,
                        "runs": args.runs, "statistic": "median",
                        "interleaved": args.interleave}, "machine": machine,
                        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                        "command": shlex.join([sys.executable, *sys.argv]), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
