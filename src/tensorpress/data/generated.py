"""Calibration text sampled from the model itself: the offline default that needs no dataset.

Each window starts from the tokenizer's BOS token (or EOS when there is none) and is sampled at
temperature 1 with no top-k/top-p truncation, so the windows follow the model's own
distribution. Sampling is seeded through a forked RNG: the global torch RNG is left as it was.
"""

from __future__ import annotations

import torch

from tensorpress.data.sources import TokenWindows
from tensorpress.errors import CalibrationError
from tensorpress.progress import track


def generated_windows(lm, samples: int, seq_len: int, seed: int, batch_size: int = 16) -> TokenWindows:
    if not lm.causal:
        raise CalibrationError(
            f"'generated' calibration needs a causal language model; {lm.spec!r} is an encoder. "
            "Pass a text file (e.g. ../shared/data/wikitext2-valid.txt) as the source"
        )
    tok = lm.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise CalibrationError(f"{lm.spec!r}: the tokenizer has neither a BOS nor an EOS token to start sampling from")
    model = lm.model
    rows = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        sizes = [min(batch_size, samples - i) for i in range(0, samples, batch_size)]
        for n in track(sizes, "sampling calibration text"):
            prompt = torch.full((n, 1), start, dtype=torch.long)
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                pad_token_id=tok.eos_token_id if tok.eos_token_id is not None else start,
            )
            rows.append(out[:, :seq_len])
    return TokenWindows(torch.cat(rows), "generated", seed, "sampled from the model, temperature 1")
