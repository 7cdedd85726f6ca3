"""Lossless coding benchmark: tensorpress.lossless against zstd (levels 3 and 19) and zipnn on the
same tensors, in one run.

Rows:
* ``minilm-l6`` float weights as shipped (float32) and cast to bfloat16 and float16: every tensor
  of the model's safetensors file, coded one tensor at a time by every coder.
* quantization codes of ``smollm2-135m`` under each ``--code-recipes`` recipe (default RTN 4-bit
  and 3-bit, group 128; GPTQ recipes work too and calibrate with protocol P1's calibration): the
  codes of every quantized linear. "original" is their bit-packed size at the nominal width (what
  a checkpoint stores); zstd gets those packed bytes, tensorpress the codes themselves. zipnn has
  no integer-code mode, so it is run on the float rows only.

For every coder: total coded bytes, bits per value, ratio, and encode / decode throughput in MB of
original data per second (median of ``--runs`` runs; zstd-19 encodes once, it is slow). Every
round trip is checked bit-exact. For tensorpress also the field-wise Shannon bound (sum over
tensors of the empirical entropy of each coded stream, plus the bits stored raw) and the gap to
it. tensorpress and zipnn decode with as many threads as there are cores; zstd (python-zstandard)
decodes on one.

    .venv/bin/python bench/lossless.py
    .venv/bin/python bench/lossless.py --runs 5 --code-recipes gptq-w4g128,gptq-w3g128
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import tensorpress as tp
from tensorpress.lossless import decode, encode_with_stats
from tensorpress.parts import CompressedLinear
from tensorpress.parts.coded import CodesStorage
from tensorpress.parts.packing import pack_bits
from tensorpress.progress import progress_bars

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext2-valid.txt"
console = Console(width=200)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="timed runs per coder (median reported)")
    p.add_argument("--float-model", default="minilm-l6", help="model whose float weights are coded")
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="float rows (comma list)")
    p.add_argument("--code-model", default="smollm2-135m", help="model whose quantization codes are coded")
    p.add_argument("--code-recipes", default="rtn-w4g128,rtn-w3g128", help="recipes producing the codes (comma list; '' for none)")
    p.add_argument("--no-zipnn", action="store_true", help="skip zipnn even if installed")
    p.add_argument("--out", type=Path, default=HERE / "results" / "lossless.json")
    return p.parse_args(argv)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_coder(name: str, items: list, encode_fn, decode_fn, check, runs: int, encode_runs: int | None = None) -> dict:
    """Encode and decode every item ``runs`` times; sizes from the first run, median times."""
    enc_times, dec_times, blobs = [], [], None
    for _ in range(encode_runs or runs):
        t, blobs = timed(lambda: [encode_fn(x) for x in items])
        enc_times.append(t)
    for _ in range(runs):
        t, outs = timed(lambda: [decode_fn(b) for b in blobs])
        dec_times.append(t)
    ok = all(check(x, o) for x, o in zip(items, outs, strict=True))
    return {"coder": name, "coded_bytes": sum(len(b) for b in blobs), "encode_s": statistics.median(enc_times),
            "decode_s": statistics.median(dec_times), "encode_runs": len(enc_times), "decode_runs": len(dec_times),
            "round_trip_exact": ok}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a) == tensor_bytes(b)


def float_items(model: str, dtype: torch.dtype) -> list[torch.Tensor]:
    from safetensors import safe_open

    from tensorpress.io.pack import resolve_source

    folder = resolve_source(model)
    items = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point():
                    items.append(t.to(dtype))
    return items


def code_items(model: str, recipe: str) -> tuple[list[tuple[torch.Tensor, int]], dict]:
    """The codes of every coded part, and the model's bits/weight before and after coding."""
    lm = tp.load_model(model)
    rec = tp.recipes.resolve(recipe)
    calib = None
    if rec.needs_calibration:
        calib = tp.data.calibration(lm, source=DATA, samples=128, seq_len=512, seed=0)
    result = tp.compress(lm, rec, calib, inplace=True)
    layers = [m for m in result.model.model.modules() if isinstance(m, CompressedLinear)]
    parts = [p for m in layers for p in m.parts if isinstance(p, CodesStorage)]
    numel = sum(m.out_features * m.in_features for m in layers)
    before = sum(m.weight_nbits() for m in layers) / numel
    for p in parts:
        p.entropy_code()
    after = sum(m.weight_nbits() for m in layers) / numel
    return [(p.codes, p.bits) for p in parts], {"bits_per_weight_linears": before, "bits_per_weight_linears_coded": after,
                                                 "compress_seconds": result.timings["total_seconds"]}


def run_set(label: str, kind: str, items: list, runs: int, use_zipnn: bool) -> dict:
    import zstandard

    if kind == "float":
        tensors = items
        raws = [tensor_bytes(t) for t in tensors]
        values = sum(t.numel() for t in tensors)
    else:
        tensors = [c for c, _ in items]
        raws = [pack_bits(c, b).numpy().tobytes() for c, b in items]  # the nominal-width storage
        values = sum(c.numel() for c in tensors)
    original = sum(len(r) for r in raws)
    stats = [encode_with_stats(t)[1] for t in tensors]
    bound_bits = sum(s.bound_bits for s in stats)
    entropy_bits = sum(s.coded_stream_entropy_bits for s in stats)
    rows = [bench_coder("tensorpress", tensors, lambda t: encode_with_stats(t)[0], decode, same_bits, runs)]
    for level, enc_runs in ((3, None), (19, 1)):
        cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        rows.append(bench_coder(f"zstd-{level}", raws, cctx.compress, dctx.decompress, lambda a, b: a == b, runs, enc_runs))
    if use_zipnn and kind == "float":
        import zipnn

        name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[tensors[0].dtype]
        z = zipnn.ZipNN(input_format="torch", bytearray_dtype=name)
        rows.append(bench_coder("zipnn", tensors, z.compress, z.decompress, same_bits, runs))
    for r in rows:
        r["bits_per_value"] = r["coded_bytes"] * 8 / values
        r["ratio"] = original / r["coded_bytes"]
        r["encode_mb_s"] = original / 1e6 / r["encode_s"]
        r["decode_mb_s"] = original / 1e6 / r["decode_s"]
    ours = rows[0]
    return {"set": label, "kind": kind, "tensors": len(tensors), "values": values, "original_bytes": original,
            "nominal_bits_per_value": original * 8 / values, "shannon_bound_bits_per_value": bound_bits / values,
            "coded_stream_entropy_bits_per_value": entropy_bits / values,
            "gap_to_bound": ours["coded_bytes"] * 8 / bound_bits - 1, "coders": rows}


def table(sets: list[dict]) -> Table:
    t = Table(title="lossless coding: every coder on the same tensors", header_style="bold")
    for col in ("set", "coder", "original MB", "coded MB", "ratio", "bits/value", "Shannon bound", "gap",
                "encode MB/s", "decode MB/s", "exact"):
        t.add_column(col, justify="left" if col in ("set", "coder") else "right")
    for s in sets:
        for i, r in enumerate(s["coders"]):
            ours = r["coder"] == "tensorpress"
            t.add_row(s["set"] if i == 0 else "", r["coder"], f"{s['original_bytes'] / 1e6:.2f}", f"{r['coded_bytes'] / 1e6:.2f}",
                      f"{r['ratio']:.3f}", f"{r['bits_per_value']:.3f}",
                      f"{s['shannon_bound_bits_per_value']:.3f}" if ours else "",
                      f"{s['gap_to_bound']:+.2%}" if ours else "", f"{r['encode_mb_s']:.0f}", f"{r['decode_mb_s']:.0f}",
                      "yes" if r["round_trip_exact"] else "NO")
        t.add_section()
    return t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    use_zipnn = not args.no_zipnn
    zipnn_version = None
    if use_zipnn:
        try:
            from importlib.metadata import version

            import zipnn  # noqa: F401

            zipnn_version = version("zipnn")
        except ImportError:
            console.print("zipnn is not installed (pip install --no-deps zipnn): its rows are skipped")
            use_zipnn = False
    sets, extra = [], {}
    for name in [d for d in args.dtypes.split(",") if d]:
        dtype = getattr(torch, name)
        console.print(f"{args.float_model} {name} ...")
        sets.append(run_set(f"{args.float_model} {name}", "float", float_items(args.float_model, dtype), args.runs, use_zipnn))
    for recipe in [r for r in args.code_recipes.split(",") if r]:
        console.print(f"{args.code_model} {recipe} codes ...")
        items, info = code_items(args.code_model, recipe)
        s = run_set(f"{args.code_model} {recipe} codes", "codes", items, args.runs, use_zipnn)
        s.update(info)
        sets.append(s)
        extra[recipe] = info
    console.print(table(sets))
    for recipe, info in extra.items():
        console.print(f"{args.code_model} {recipe}: bits/weight of the compressed linears {info['bits_per_weight_linears']:.3f} "
                      f"nominal → {info['bits_per_weight_linears_coded']:.3f} with the codes entropy-coded (scales and zeros as before)")
    import zstandard

    machine = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "numpy": np.__version__, "zstandard": zstandard.__version__, "zipnn": zipnn_version,
               "tensorpress": tp.__version__, "load_avg_at_start": load_at_start}
    console.print(f"command: {command}\nmachine: {machine['processor']}, {machine['cpu_count']} CPUs, {machine['platform']}, "
                  f"load average at start {' / '.join(map(str, load_at_start))}\ndate: {started}; medians of {args.runs} runs "
                  "(zstd-19 encode: 1 run); MB = 10^6 bytes of original data")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "date": started, "machine": machine, "runs": args.runs, "sets": sets}
    args.out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    with progress_bars(None):
        sys.exit(main())
