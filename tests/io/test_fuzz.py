"""Fuzzing every file format tensorpress reads from a directory it did not write.

Each test mutates one real file — a checkpoint's ``manifest.json``, a packed directory's
``lossless.json``, a recipe's YAML, a safetensors header, a GGUF header — in ways a broken
download or a hostile author would (truncations, flipped bytes, wrong types, huge counts,
hostile names, deleted and added keys) and asserts that every case ends in a typed
``tensorpress.errors`` exception or a correct load, writes nothing outside the output
directory and takes under a second. ``FUZZ_CASES`` cases per format (hypothesis,
derandomised so CI runs the same cases; set ``TENSORPRESS_FUZZ_CASES`` to run more).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_hf_dir, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorpress as tp
from tensorpress.errors import TensorpressError
from tensorpress.io.headers import gguf_header, safetensors_header
from tensorpress.io.pack import PACK_MANIFEST, pack, unpack

FUZZ_CASES = int(os.environ.get("TENSORPRESS_FUZZ_CASES", "2000"))
FUZZ = settings(max_examples=FUZZ_CASES, deadline=1000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
ABSOLUTE = "/tmp/tensorpress-fuzz-escaped"

HOSTILE_STRINGS = ["../escaped", "../../escaped", "a/../../escaped", ABSOLUTE, "", ".", "..", "x" * 5000, "\x00",
                   "config.json/inner", "model.layers.0", "float13", "F33", "re:(", "-1", "nan"]
HOSTILE_VALUES = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from([None, True, False, 0, -1, 1 << 62, -(1 << 62), 2 ** 64 + 1, 1.5, float("nan"), float("inf"), [], {}, [0], [1 << 40, 1 << 40]]),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.text(max_size=20),
    st.lists(st.integers(-5, 1 << 20), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _paths(node, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value, the root included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def json_mutations(draw, document):
    """A mutated copy of ``document`` as bytes: a value replaced, a key deleted or added, a key
    renamed to a hostile one, or the JSON text truncated or with bytes flipped."""
    kind = draw(st.sampled_from(["replace", "replace", "delete", "add", "rename", "truncate", "flip"]))
    text = json.dumps(document).encode()
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "flip":
        data = bytearray(text)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    doc = json.loads(text)
    paths = list(_paths(doc))
    path = draw(st.sampled_from(paths[1:] if kind in ("delete", "rename") else paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if kind == "replace":
        value = draw(HOSTILE_VALUES)
        if not path:
            doc = value
        else:
            parent[path[-1]] = value
    elif kind == "delete":
        del parent[path[-1]]
    else:
        target = doc
        for key in path if kind == "add" else path[:-1]:
            target = target[key]
        if not isinstance(target, (dict, list)):
            target = parent if isinstance(parent, (dict, list)) else doc
        name = draw(st.sampled_from(HOSTILE_STRINGS))
        if isinstance(target, list):
            target.append(draw(HOSTILE_VALUES))
        elif kind == "rename" and isinstance(parent, dict):
            parent[name] = parent.pop(path[-1])
        elif isinstance(target, dict):
            target[name] = draw(HOSTILE_VALUES)
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def byte_mutations(draw, data: bytes, region: int):
    """``data`` truncated, with bytes flipped, or with an 8-byte little-endian count overwritten
    by a huge or negative one, within its first ``region`` bytes (the header)."""
    kind = draw(st.sampled_from(["truncate", "flip", "count"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, region - 1))] ^= draw(st.integers(1, 255))
    else:
        at = draw(st.integers(0, region - 8))
        value = draw(st.sampled_from([0, 1, 255, 1 << 31, 1 << 32, 1 << 40, 1 << 63, (1 << 64) - 1]))
        out[at:at + 8] = struct.pack("<Q", value)
    return bytes(out)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


IDS = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    lm = tiny_model("llama")
    result = tp.compress(lm, tp.recipes.get("rtn-w4g128"))
    result.save(root / "ckpt")
    save_hf_dir(tiny_model("llama"), root / "hf")
    pack(root / "hf", root / "packed")
    return root


OUTCOMES: dict[str, dict[str, int]] = {}


def _ends_well(call, fmt: str):
    """Run ``call``: a typed error or a normal return are the two acceptable ends (counted per
    format and error type; ``pytest -s`` prints the counts)."""
    counts = OUTCOMES.setdefault(fmt, {})
    try:
        result = call()
    except TensorpressError as exc:
        counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
        return None
    counts["loaded"] = counts.get("loaded", 0) + 1
    return result


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    yield
    for fmt, counts in OUTCOMES.items():
        print(f"\nfuzz {fmt}: {sum(counts.values())} cases: {counts}")


def test_fuzz_checkpoint_manifest(fuzz_root, tmp_path):
    ckpt = tmp_path / "sandbox" / "ckpt"
    shutil.copytree(fuzz_root / "ckpt", ckpt)
    original = json.loads((ckpt / "manifest.json").read_text())
    reference = _logits(tp.load_compressed(ckpt), IDS)
    before = _tree(tmp_path)
    loads = []

    @FUZZ
    @given(st.data())
    def case(data):
        (ckpt / "manifest.json").write_bytes(data.draw(json_mutations(original)))
        lm = _ends_well(lambda: tp.load_compressed(ckpt), "manifest.json")
        if lm is not None:  # loaded: it must be the model that was saved
            loads.append(1)
            if next(lm.model.parameters()).dtype == torch.float32:
                # equal up to float32 summation order: an equivalent setting (group_size 65 for a
                # 64-wide layer) may route a layer through the dense path instead of the packed kernel
                torch.testing.assert_close(_logits(lm, IDS), reference, rtol=1e-5, atol=1e-6)
        assert _tree(tmp_path) == before and not os.path.exists(ABSOLUTE)

    case()
    assert loads, "no mutation loaded: the fuzzer never reached a full load"


def test_fuzz_lossless_manifest(fuzz_root, tmp_path):
    packed = tmp_path / "sandbox" / "packed"
    shutil.copytree(fuzz_root / "packed", packed)
    original = json.loads((packed / PACK_MANIFEST).read_text())
    out = tmp_path / "sandbox" / "out"
    # every file written is an original or (listed as a plain file) one of the packed directory's own
    originals = {p.read_bytes() for folder in ("hf", "packed") for p in (fuzz_root / folder).rglob("*") if p.is_file()}
    before = _tree(tmp_path)

    @FUZZ
    @given(st.data())
    def case(data):
        (packed / PACK_MANIFEST).write_bytes(data.draw(json_mutations(original)))
        done = _ends_well(lambda: unpack(packed, out, overwrite=True), "lossless.json")
        if done is not None:  # unpacked: every file written is one of the originals, byte for byte
            written = [f.read_bytes() for f in out.rglob("*") if f.is_file()]
            shutil.rmtree(out)  # (names are the manifest's to choose, inside the output)
            assert all(blob in originals for blob in written)
        assert _tree(tmp_path) ^ before == set() and not os.path.exists(ABSOLUTE)

    case()


def test_fuzz_recipe_yaml(tmp_path):
    original = yaml.safe_load(tp.recipes.get("gptq-w4g128").to_yaml())
    original["stages"].append({"method": "eora", "rank": 8, "targets": ["re:.*mlp.*"]})
    path = tmp_path / "r.yaml"

    @FUZZ
    @given(st.data())
    def case(data):
        blob = data.draw(json_mutations(original))
        if data.draw(st.booleans()):  # as YAML text, too: YAML's own syntax errors
            try:
                blob = yaml.safe_dump(json.loads(blob)).encode()
            except ValueError:
                pass
        path.write_bytes(blob)
        recipe = _ends_well(lambda: tp.Recipe.from_yaml(path), "recipe YAML")
        if recipe is not None:
            assert tp.Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()

    case()


def test_fuzz_safetensors_header(fuzz_root, tmp_path):
    from tensorpress.io.checkpoint import _load_tensors

    source = fuzz_root / "ckpt" / "dense.safetensors"
    raw = source.read_bytes()
    region = 8 + struct.unpack("<Q", raw[:8])[0]
    reference = _load_tensors(source)
    path = tmp_path / "w.safetensors"

    @FUZZ
    @given(st.data())
    def case(data):
        path.write_bytes(data.draw(byte_mutations(raw, region)))
        tensors = _ends_well(lambda: _load_tensors(path), "safetensors")
        if tensors is not None:  # read: the header said something consistent with the bytes
            header = safetensors_header(path)
            assert all(list(tensors[k].shape) == header[k]["shape"] for k in tensors)
            assert set(tensors) <= set(reference) | {k for k in header if k != "__metadata__"}

    case()


def _gguf_file(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_token_list(["<unk>", "<s>", "</s>", "a", "b"])
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0])
    writer.add_tensor("token_embd.weight", np.arange(5 * 32, dtype=np.float32).reshape(5, 32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_fuzz_gguf_header(tmp_path):
    from gguf import GGUFReader

    raw = _gguf_file(tmp_path / "orig.gguf").read_bytes()
    region = len(raw) - 5 * 32 * 4 - 32 * 2  # everything before the tensor data
    path = tmp_path / "m.gguf"

    @FUZZ
    @given(st.data())
    def case(data):
        path.write_bytes(data.draw(byte_mutations(raw, region)))
        header = _ends_well(lambda: gguf_header(path), "GGUF")
        if header is not None:  # passed the walk: the gguf package must read it cleanly too
            reader = GGUFReader(str(path))
            assert {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors} == {
                name: shape for name, (_, shape) in header["tensors"].items()}
            for t in reader.tensors:
                np.asarray(t.data).sum()

    case()
