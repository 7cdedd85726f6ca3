"""``kill -9`` during ``save``, ``pack`` and ``export``: the output path is always either absent
or a complete version, never a partial one.

A child process rewrites the same output again and again (``overwrite=True``); the parent
kills it with SIGKILL at seeded random moments and checks what the path holds: every file
matching its manifest (checkpoint, packed directory) or a directory ``transformers`` loads
with the saved weights (export).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import save_hf_dir, tiny_model

import tensorpress as tp

KILLS = 4  # per operation

CHILD = r"""
import sys
from pathlib import Path

import tensorpress as tp
from tensorpress.io.pack import pack

op, source, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if op == "pack":
    work = lambda: pack(source, target, overwrite=True)
else:
    result = tp.compress(tp.load_model(source), tp.recipes.get("rtn-w4g128"))
    if op == "save":
        work = lambda: result.save(target, overwrite=True)
    else:
        work = lambda: tp.io.export_hf(result.model, target, overwrite=True)
while True:
    print("tick", flush=True)
    work()
"""


def _complete(op: str, target, reference: torch.Tensor, ids: torch.Tensor) -> None:
    if op in ("save", "pack"):
        assert set(tp.io.verify(target).values()) == {None}
    lm = tp.load_compressed(target) if op != "export" else tp.load_model(target)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    if op == "export":  # dequantized into nn.Linear: the same weights, another summation order
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(logits, reference)


@pytest.mark.parametrize("op", ["save", "pack", "export"])
def test_kill_9_leaves_the_complete_previous_version(tmp_path, op):
    lm = tiny_model("llama")
    hf = save_hf_dir(lm, tmp_path / "hf")
    result = tp.compress(tp.load_model(hf), tp.recipes.get("rtn-w4g128"))
    ckpt = result.save(tmp_path / "ckpt")
    source = ckpt if op == "pack" else hf
    target = tmp_path / "out"
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = result.model.model(input_ids=ids).logits
    rng = random.Random(17)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for kill in range(KILLS):
        child = subprocess.Popen([sys.executable, "-c", CHILD, op, str(source), str(target)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, env=env)
        try:
            for _ in range(2 + kill):  # let it finish a few rewrites first
                assert child.stdout.readline().startswith(b"tick"), "the writer died before it was killed"
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside a rewrite
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert target.is_dir(), f"kill {kill}: {target} vanished"
        _complete(op, target, reference, ids)
