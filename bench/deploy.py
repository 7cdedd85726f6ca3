"""Deployment benchmark, protocol P1 (../shared/data/README.md): tensorpress' GGUF exports run in
llama.cpp (through llama-cpp-python, `make runtimes`), next to llama.cpp's own quantizer on the
same float16 GGUF, at equal file size.

For each file: its size, bits/weight of the linears, the ggml types of its tensors, llama.cpp's
perplexity on the P1 windows, the KL divergence (and top-1 agreement) of its next-token
distributions to the float16 file's in llama.cpp, and, for tensorpress' exports, tensorpress' own
perplexity of the same model (llama.cpp quantizes activations inside its quantized matmuls, so
the two agree to about a percent, not exactly). Then decode tokens/s in llama.cpp.

llama.cpp's files are made by `llama_model_quantize` with its file type's own mix; tensorpress'
`<method>-<file type>` recipes (`file_type:`) give every tensor, the token table included, the
same type, so each pair of files has the same tensor types and the same size. Without an
importance matrix: llama-cpp-python exposes no imatrix computation and `llama_model_quantize`
takes it only as a C++ map.

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
FTYPES = {"q4_0": 2, "q8_0": 7, "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama.h


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=128, help="calibration windows (P1: 128)")
    p.add_argument("--file-types", default="q4_0,q4_k_m,q3_k_m,q2_k", help=f"of {', '.join(FTYPES)}")
    p.add_argument("--methods", default="gptq,awq", help="tensorpress' <method>-<file type> built-in recipes, where they exist")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--checkpoint-windows", type=int, default=8,
                   help="windows on which transformers' logits of the compressed-tensors / GPTQ exports are compared")
    p.add_argument("--no-gguf", action="store_true", help="only the compressed-tensors / GPTQ checks")
    p.add_argument("--llama-tools", type=Path, default=None,
                   help="a directory with llama.cpp's llama-imatrix and llama-quantize (built from the same release): "
                        "adds llama.cpp's quantizer with an importance matrix from the calibration windows")
    p.add_argument("--imatrix-only", action="store_true", help="with --llama-tools: only the imatrix rows")
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


GPTQ_PYTHON = Path(__file__).resolve().parents[1] / ".venv-gptq" / "bin" / "python"


def gptq_logits(path: Path, ids: torch.Tensor, work: Path) -> tuple[torch.Tensor, float]:
    """transformers' logits of a GPTQ directory, computed in the venv `make gptq-runtime` builds."""
    import subprocess

    from safetensors.torch import load_file, save_file

    save_file({"ids": ids.contiguous()}, work / "ids.safetensors")
    subprocess.run([str(GPTQ_PYTHON), str(Path(__file__).with_name("gptq_load.py")), str(path),
                    str(work / "ids.safetensors"), str(work / "gptq-logits.safetensors")], check=True,
                   capture_output=True)
    out = load_file(work / "gptq-logits.safetensors")
    return out["logits"], float(out["load_s"][0])


def checkpoint_rows(lm, windows, calib, work: Path, count: int) -> list[dict]:
    """Export one GPTQ result as compressed-tensors and GPTQ directories (float32, so the stored
    scales are used as they are), load each with transformers and compare its logits with
    tensorpress' on the first ``count`` windows. GPTQ needs optimum and gptqmodel, which would
    move torch in the main venv: it is loaded in `.venv-gptq` (`make gptq-runtime`) when that
    exists; without it the row says why it did not load."""
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
            if fmt == "gptq" and GPTQ_PYTHON.exists():
                theirs, row["load_s"] = gptq_logits(path, ids, work)
                row["runtime"] = "transformers + gptqmodel (backend torch), .venv-gptq"
            else:
                model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
                row["load_s"] = time.perf_counter() - start
                with torch.no_grad():
                    theirs = torch.cat([model(ids[i: i + 1]).logits.float() for i in range(len(ids))])
                row["runtime"] = "transformers + compressed-tensors" if fmt != "gptq" else "transformers"
        except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            continue
        row["max_abs_diff"] = float((theirs - ours).abs().max())
        row["max_abs_logit"] = float(ours.abs().max())
        row["identical"] = bool(torch.equal(theirs, ours))
        targets = ids[:, 1:]
        for key, logits in (("ppl", theirs), ("tensorpress_ppl", ours)):
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            row[key] = float(torch.exp(-logp.gather(-1, targets[..., None]).mean()))
        rows.append(row)
    return rows


def imatrix_files(tools: Path, lm, calib, ref_path: Path, work: Path, file_types: list[str]) -> dict[str, Path]:
    """llama.cpp's own pipeline with an importance matrix: `llama-imatrix` over the calibration
    windows' text (decoded, so it tokenizes them again, in windows of the same length), then
    `llama-quantize --imatrix` to each file type."""
    import subprocess

    text = work / "calibration.txt"
    text.write_text("\n".join(lm.tokenizer.decode(row) for row in calib.input_ids.tolist()), encoding="utf-8")
    matrix = work / "imatrix.gguf"
    subprocess.run([str(tools / "llama-imatrix"), "-m", str(ref_path), "-f", str(text), "-o", str(matrix),
                    "-c", str(calib.seq_len), "--chunks", str(len(calib.input_ids)), "-t", "2", "--no-ppl"],
                   check=True, capture_output=True)
    out = {}
    for file_type in file_types:
        path = work / f"llama-{file_type}-imatrix.gguf"
        subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(matrix), str(ref_path), str(path),
                        file_type.upper(), "2"], check=True, capture_output=True)
        out[file_type] = path
    return out


def tensorpress_decode(model, tokens: int, packed: bool) -> float:
    """Greedy decode tokens/s of a tensorpress model (batch 1, 32-token prompt), median of 3
    after a warm-up, with the packed kernels on or off: the same count as ``decode_speed``."""
    from tensorpress.parts.kernels import packed_kernels

    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    runs = []
    with torch.inference_mode(), packed_kernels(packed):
        model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for _ in range(3):
            start = time.perf_counter()
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            runs.append(tokens / (time.perf_counter() - start))
    return float(np.median(runs))


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
    rows.append({"group": "f16", "file": "float16 (tensorpress export)", "path": str(ref_path), "llama_ppl": ppl, "kl": 0.0,
                 "top1": 1.0, "tensorpress_ppl": tp_ref})

    calib = tp.data.calibration(lm, source=args.data, samples=args.samples, seq_len=args.seq_len, seed=0)
    imatrix = {}
    if args.llama_tools is not None:
        imatrix = imatrix_files(args.llama_tools, lm, calib, ref_path, work, args.file_types.split(","))
    for file_type in args.file_types.split(","):
        if file_type in imatrix:
            ppl, kl, top1, _ = scores(llama_cpp, imatrix[file_type], ids, reference)
            rows.append({"group": file_type, "file": f"llama.cpp quantize {file_type.upper()} + imatrix",
                         "path": str(imatrix[file_type]), "llama_ppl": ppl, "kl": kl, "top1": top1,
                         "tensorpress_ppl": None})
        if args.imatrix_only:
            continue
        path = work / f"llama-{file_type}.gguf"
        seconds = quantize_with_llama_cpp(llama_cpp, ref_path, path, FTYPES[file_type])
        ppl, kl, top1, _ = scores(llama_cpp, path, ids, reference)
        rows.append({"group": file_type, "file": f"llama.cpp quantize {file_type.upper()}", "path": str(path),
                     "llama_ppl": ppl, "kl": kl, "top1": top1, "tensorpress_ppl": None, "seconds": seconds})
        for method in args.methods.split(","):
            recipe = f"{method}-{file_type}"
            if recipe not in tp.recipes.builtin_names():
                continue
            start = time.perf_counter()
            result = tp.compress(lm, recipe, calib)
            seconds = time.perf_counter() - start
            path = tp.io.export(result, work / f"{recipe}.gguf", format="gguf", dtype="f16", overwrite=True)
            ppl, kl, top1, _ = scores(llama_cpp, path, ids, reference)
            own = tp.evaluate(result, data=windows).perplexity
            rows.append({"group": file_type, "file": f"tensorpress {recipe}", "path": str(path), "llama_ppl": ppl,
                         "kl": kl, "top1": top1, "tensorpress_ppl": own, "seconds": seconds})
            del result

    for row in rows:
        row["mb"], row["linear_bpw"], row["types"] = describe_file(Path(row["path"]))
        row["decode_tok_s"] = None if args.imatrix_only else decode_speed(llama_cpp, Path(row["path"]), args.decode_tokens)
    own_speed = {}
    if not args.imatrix_only:
        own_speed["tensorpress fp32 (transformers forward)"] = tensorpress_decode(lm.model, args.decode_tokens, False)
        packed = tp.compress(lm, "rtn-w4g128").model.model
        own_speed["tensorpress rtn-w4g128, packed int4 kernel"] = tensorpress_decode(packed, args.decode_tokens, True)
        del packed

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}"
    title = (f"{args.model}: P1, {windows.samples} windows x {args.seq_len} tokens (last 40 %), calibration "
             f"{args.samples} x {args.seq_len}, seed 0 — llama.cpp via llama-cpp-python"
             + (", importance matrix only in the rows that say so" if imatrix else ", no importance matrix"))
    table = Table(title=title, header_style="bold")
    for col in ("file", "MB", "b/w blocks", "llama.cpp ppl", "KL to f16", "KL vs llama.cpp", "top-1", "tensorpress ppl",
                "ppl gap", "decode tok/s", "tensors"):
        table.add_column(col)
    baseline = {r["group"]: r for r in rows if r["file"].startswith("llama.cpp") and "imatrix" not in r["file"]}
    for r in rows:
        gap = "" if r["tensorpress_ppl"] is None else f"{100 * (r['llama_ppl'] / r['tensorpress_ppl'] - 1):+.2f} %"
        base = baseline.get(r["group"])
        versus = ""
        if base is not None and r is not base and base["kl"] > 0:
            r["kl_change_vs_llama_cpp"] = r["kl"] / base["kl"] - 1
            r["size_vs_llama_cpp"] = r["mb"] / base["mb"] - 1
            versus = f"{100 * r['kl_change_vs_llama_cpp']:+.1f} % (size {100 * r['size_vs_llama_cpp']:+.2f} %)"
        table.add_row(r["file"], f"{r['mb']:.2f}", f"{r['linear_bpw']:.3f}", f"{r['llama_ppl']:.3f}", f"{r['kl']:.4f}",
                      versus, f"{r['top1']:.3f}", "" if r["tensorpress_ppl"] is None else f"{r['tensorpress_ppl']:.3f}",
                      gap, "" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}", r["types"])
    console.print(table)
    for name, speed in own_speed.items():
        console.print(f"{name}: decode {speed:.1f} tok/s (same prompt length and token count, same run)")
    checkpoints = [] if args.imatrix_only else checkpoint_rows(lm, windows, calib, work, args.checkpoint_windows)
    if checkpoints:
        print_checkpoints(console, checkpoints)
    console.print(f"machine: {machine}\ncommand: {' '.join(['bench/deploy.py', *(argv or sys.argv[1:])])}")
    if args.imatrix_only:
        args.out = args.out.with_name(args.out.stem + "-imatrix.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"title": title, "machine": machine, "rows": rows, "tensorpress_decode": own_speed,
                                    "checkpoints": checkpoints}, indent=1))
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
