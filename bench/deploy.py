"""Deployment benchmark, protocol P1 (../shared/data/README.md): tensorpress' GGUF exports run in
llama.cpp (through llama-cpp-python, `make runtimes`), next to llama.cpp's own quantizer on the
same float16 GGUF, at equal file size.

For each file: its size, bits/weight of the linears, the ggml types of its tensors, llama.cpp's
perplexity on the P1 windows, the KL divergence (and top-1 agreement) of its next-token
distributions to the float16 file's in llama.cpp, and, for tensorpress' exports, tensorpress' own
perplexity of the same model (llama.cpp quantizes activations inside its quantized matmuls, so
the two agree to about a percent, not exactly). Then decode tokens/s in llama.cpp.

llama.cpp's files are made by `llama_model_quantize` with the token embeddings kept at F16,
as tensorpress' exports keep them, so both files quantize the same tensors (the linears) and
compare at the same size. Without `--imatrix`-style statistics (not run here).

    .venv/bin/python bench/deploy.py                       # 40 windows, 128 calibration windows
    .venv/bin/python bench/deploy.py --windows 10 --samples 32
    .venv/bin/python bench/deploy.py --no-gguf             # only the compressed-tensors / GPTQ checks

Then one GPTQ result (4-bit, groups of 64) is exported as compressed-tensors and GPTQ
directories and loaded by transformers, whose logits are compared with tensorpress' own.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import tensorpress as tp
from tensorpress.io.headers import gguf_header

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-valid.txt"
TP_RECIPES = ("rtn-q4_0", "gptq-q4_0", "awq-q4_0")
LLAMA_TYPES = {"Q4_0": 2}  # llama_ftype values (llama.h): LLAMA_FTYPE_MOSTLY_Q4_0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=128, help="calibration windows (P1: 128)")
    p.add_argument("--recipes", default=",".join(TP_RECIPES))
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--checkpoint-windows", type=int, default=8,
                   help="windows on which transformers' logits of the compressed-tensors / GPTQ exports are compared")
    p.add_argument("--no-gguf", action="store_true", help="only the compressed-tensors / GPTQ checks")
    p.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "deploy-smollm2-135m.json")
    return p.parse_args(argv)


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: run `make runtimes` (it compiles llama.cpp, ~20 min on 2 cores)")
    return llama_cpp


def quantize_with_llama_cpp(llama_cpp, src: Path, dst: Path, ftype: int) -> float:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.token_embedding_type = 1  # GGML_TYPE_F16: as tensorpress' exports keep them
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return time.perf_counter() - start


def run_llama_cpp(llama_cpp, path: Path, windows: torch.Tensor):
    """Next-token log-probabilities of every window in llama.cpp: float32 (n, seq-1, vocab) is too
    large to keep for 40 windows, so yield them window by window."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                          n_threads=2, verbose=False)
    try:
        for row in windows.tolist():
            llm.reset()
            llm.eval(row)
            logits = np.array(llm.scores[: len(row) - 1], dtype=np.float64)
            yield logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    finally:
        llm.close()


def scores(llama_cpp, path: Path, windows: torch.Tensor, reference: list | None):
    """(perplexity, KL to the reference's log-probs, top-1 agreement, the log-probs' argmax/lse
    summary when this is the reference)."""
    nll, kl, agree, count, kept = 0.0, 0.0, 0, 0, []
    targets = windows[:, 1:].numpy()
    for i, logp in enumerate(run_llama_cpp(llama_cpp, path, windows)):
        nll -= logp[np.arange(len(logp)), targets[i]].sum()
        count += len(logp)
        if reference is None:
            kept.append(logp.astype(np.float32))
        else:
            ref = reference[i].astype(np.float64)
            kl += (np.exp(ref) * (ref - logp)).sum()
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    ppl = math.exp(nll / count)
    if reference is None:
        return ppl, 0.0, 1.0, kept
    return ppl, kl / count, agree / count, None


def decode_speed(llama_cpp, path: Path, tokens: int) -> float:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    try:
        prompt = llm.tokenize(b"The history of the city begins")
        runs = []
        for _ in range(3):
            llm.reset()
            llm.eval(prompt)
            start = time.perf_counter()
            for _ in range(tokens):
                token = llm.sample(temp=0.0)
                llm.eval([token])
            runs.append(tokens / (time.perf_counter() - start))
        return float(np.median(runs))
    finally:
        llm.close()


def describe_file(path: Path) -> tuple[float, float, str]:
    """(MB, bits/weight of the 2-D block tensors, 'count TYPE' list)."""
    header = gguf_header(path)
    types = Counter(kind for kind, _ in header["tensors"].values())
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    bits = weights = 0
    for t in GGUFReader(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(t.tensor_type)]
            bits += int(t.n_elements) * 8 * nbytes / block
            weights += int(t.n_elements)
    return path.stat().st_size / 1e6, bits / weights, ", ".join(f"{n} {k}" for k, n in sorted(types.items()))


CHECKPOINT_STAGE = {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True}  # 64 divides 576 and 1536


def checkpoint_rows(lm, windows, calib, work: Path, count: int) -> list[dict]:
    """Export one GPTQ result as compressed-tensors and GPTQ directories (float32, so the stored
    scales are used as they are), load each with transformers and compare its logits with
    tensorpress' on the first ``count`` windows. GPTQ needs gptqmodel (not in the main venv: it
    would move torch); without it that row says so."""
    from transformers import AutoModelForCausalLM

    result = tp.compress(lm, tp.Recipe(stages=[CHECKPOINT_STAGE]), calib)
    ids = windows.input_ids[:count]
    with torch.no_grad():
        ours = torch.cat([result.model.model(ids[i: i + 1]).logits.float() for i in range(len(ids))])
    rows = []
    for fmt in ("compressed-tensors", "gptq"):
        path = tp.io.export(result, work / f"gptq-w4g64-{fmt}", format=fmt, dtype="f32", overwrite=True)
        mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
        row = {"format": fmt, "path": str(path), "mb": mb, "windows": len(ids)}
        start = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
        except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            continue
        row["load_s"] = time.perf_counter() - start
        with torch.no_grad():
            theirs = torch.cat([model(ids[i: i + 1]).logits.float() for i in range(len(ids))])
        row["max_abs_diff"] = float((theirs - ours).abs().max())
        row["max_abs_logit"] = float(ours.abs().max())
        row["identical"] = bool(torch.equal(theirs, ours))
        targets = ids[:, 1:]
        for key, logits in (("ppl", theirs), ("tensorpress_ppl", ours)):
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            row[key] = float(torch.exp(-logp.gather(-1, targets[..., None]).mean()))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_gguf:
        return checkpoints_only(args, argv)
    llama_cpp = llama_cpp_module()
    if not args.data.is_file():
        sys.exit(f"{args.data} not found: pass --data (P1 uses ../shared/data/wikitext2-valid.txt)")
    torch.set_num_threads(2)
    console = Console(width=250)
    lm = tp.load_model(args.model)
    windows = tp.data.evaluation(lm, args.data, seq_len=args.seq_len, windows=args.windows)
    ids = windows.input_ids
    work = args.work or Path(tempfile.mkdtemp(prefix="tensorpress-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    ref_path = tp.io.export(lm, work / "f16.gguf", format="gguf", dtype="f16", overwrite=True)
    ppl, _, _, reference = scores(llama_cpp, ref_path, ids, None)
    tp_ref = tp.evaluate(lm, data=windows).perplexity
    rows.append({"file": "float16 (tensorpress export)", "path": str(ref_path), "llama_ppl": ppl, "kl": 0.0, "top1": 1.0,
                 "tensorpress_ppl": tp_ref})

    for name, ftype in LLAMA_TYPES.items():
        path = work / f"llama-{name.lower()}.gguf"
        seconds = quantize_with_llama_cpp(llama_cpp, ref_path, path, ftype)
        ppl, kl, top1, _ = scores(llama_cpp, path, ids, reference)
        rows.append({"file": f"llama.cpp quantize {name} (embeddings F16)", "path": str(path), "llama_ppl": ppl, "kl": kl,
                     "top1": top1, "tensorpress_ppl": None, "seconds": seconds})

    calib = None
    for recipe in args.recipes.split(","):
        rec = tp.recipes.get(recipe)
        needs_calib = any(s.needs for s in rec.stages)
        if needs_calib and calib is None:
            calib = tp.data.calibration(lm, source=args.data, samples=args.samples, seq_len=args.seq_len, seed=0)
        start = time.perf_counter()
        result = tp.compress(lm, rec, calib if needs_calib else None)
        seconds = time.perf_counter() - start
        path = tp.io.export(result, work / f"{recipe}.gguf", format="gguf", dtype="f16", overwrite=True)
        ppl, kl, top1, _ = scores(llama_cpp, path, ids, reference)
        own = tp.evaluate(result, data=windows).perplexity
        rows.append({"file": f"tensorpress {recipe}", "path": str(path), "llama_ppl": ppl, "kl": kl, "top1": top1,
                     "tensorpress_ppl": own, "seconds": seconds})

    for row in rows:
        row["mb"], row["linear_bpw"], row["types"] = describe_file(Path(row["path"]))
        row["decode_tok_s"] = decode_speed(llama_cpp, Path(row["path"]), args.decode_tokens)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}"
    title = (f"{args.model}: P1, {windows.samples} windows x {args.seq_len} tokens (last 40 %), calibration "
             f"{args.samples} x {args.seq_len}, seed 0 — llama.cpp via llama-cpp-python")
    table = Table(title=title, header_style="bold")
    for col in ("file", "MB", "b/w linears", "llama.cpp ppl", "KL to f16", "top-1", "tensorpress ppl", "ppl gap", "decode tok/s", "tensors"):
        table.add_column(col)
    for r in rows:
        gap = "" if r["tensorpress_ppl"] is None else f"{100 * (r['llama_ppl'] / r['tensorpress_ppl'] - 1):+.2f} %"
        table.add_row(r["file"], f"{r['mb']:.1f}", f"{r['linear_bpw']:.3f}", f"{r['llama_ppl']:.3f}", f"{r['kl']:.4f}",
                      f"{r['top1']:.3f}", "" if r["tensorpress_ppl"] is None else f"{r['tensorpress_ppl']:.3f}", gap,
                      f"{r['decode_tok_s']:.1f}", r["types"])
    console.print(table)
    if calib is None:
        calib = tp.data.calibration(lm, source=args.data, samples=args.samples, seq_len=args.seq_len, seed=0)
    checkpoints = checkpoint_rows(lm, windows, calib, work, args.checkpoint_windows)
    print_checkpoints(console, checkpoints)
    console.print(f"machine: {machine}\ncommand: {' '.join(['bench/deploy.py', *(argv or sys.argv[1:])])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"title": title, "machine": machine, "rows": rows, "checkpoints": checkpoints}, indent=1))
    console.print(f"wrote {args.out}")
    return 0


def print_checkpoints(console, rows: list[dict]) -> None:
    table = Table(title=f"transformers loading tensorpress' exports of {CHECKPOINT_STAGE} (float32 files)",
                  header_style="bold")
    for col in ("format", "MB", "windows", "transformers ppl", "tensorpress ppl", "max |logit diff|", "identical", "note"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["format"], f"{r['mb']:.1f}", "", "", "", "", "", f"not loaded: {r['error']}")
            continue
        table.add_row(r["format"], f"{r['mb']:.1f}", str(r["windows"]), f"{r['ppl']:.4f}", f"{r['tensorpress_ppl']:.4f}",
                      f"{r['max_abs_diff']:.3g} (of {r['max_abs_logit']:.1f})", "yes" if r["identical"] else "no", "")
    console.print(table)


def checkpoints_only(args, argv) -> int:
    torch.set_num_threads(2)
    console = Console(width=250)
    lm = tp.load_model(args.model)
    windows = tp.data.evaluation(lm, args.data, seq_len=args.seq_len, windows=args.windows)
    calib = tp.data.calibration(lm, source=args.data, samples=args.samples, seq_len=args.seq_len, seed=0)
    work = args.work or Path(tempfile.mkdtemp(prefix="tensorpress-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = checkpoint_rows(lm, windows, calib, work, args.checkpoint_windows)
    print_checkpoints(console, rows)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    console.print(f"machine: {machine}\ncommand: {' '.join(['bench/deploy.py', *(argv or sys.argv[1:])])}")
    out = args.out.with_name(args.out.stem + "-checkpoints.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "checkpoints": rows}, indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
