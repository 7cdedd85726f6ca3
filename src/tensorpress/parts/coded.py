"""Entropy-coded integer codes, shared by the parts that hold ``codes`` of ``bits`` bits.

By default codes are stored bit-packed at their nominal width. After ``entropy_code()`` (the
``lossless`` recipe stage calls it) they are stored rANS-coded with a per-tensor frequency table
(``tensorpress.lossless``), and ``nbits`` counts the coded size, header and table included:
the storage a checkpoint really takes. Codes that would code to more than their packed size
stay packed, so coding never raises a part's storage. In memory the codes stay unpacked either way.
"""

from __future__ import annotations

from typing import Any

import torch

from tensorpress.parts.packing import pack_bits, unpack_bits

CODED = "tplc"  # meta value naming the coding of a saved codes tensor


class CodesStorage:
    """Mixin: how a part's ``codes`` (uint8, values < 2**bits) are stored and counted."""

    codes: torch.Tensor
    bits: int
    _coded_codes: bytes | None = None

    def entropy_code(self) -> None:
        """Store the codes entropy-coded from now on, where that is smaller than packing them at
        ``bits`` bits (idempotent). The coder sees uint8 values, so for a small tensor of
        near-uniform codes its header, table and sub-byte excess over the entropy can outweigh
        the saving against the packed width: those codes stay packed."""
        from tensorpress.lossless import encode

        if self._coded_codes is None:
            blob = encode(self.codes)
            if len(blob) * 8 < self.codes.numel() * self.bits:
                self._coded_codes = blob

    @property
    def codes_coded(self) -> bool:
        return self._coded_codes is not None

    def codes_nbits(self) -> int:
        if self._coded_codes is not None:
            return len(self._coded_codes) * 8
        return self.codes.numel() * self.bits

    def codes_state(self) -> tuple[torch.Tensor, dict[str, Any]]:
        if self._coded_codes is not None:
            return torch.frombuffer(bytearray(self._coded_codes), dtype=torch.uint8), {"codes_coding": CODED}
        return pack_bits(self.codes, self.bits), {}

    @staticmethod
    def codes_from_state(stored: torch.Tensor, meta: dict[str, Any], bits: int, shape: tuple[int, int]) -> tuple[torch.Tensor, bytes | None]:
        """The unpacked codes, and the coded bytes when they were stored coded."""
        if meta.get("codes_coding") == CODED:
            from tensorpress.lossless import decode

            blob = stored.contiguous().numpy().tobytes()
            codes = decode(blob)
            if codes.dtype != torch.uint8 or codes.numel() != shape[0] * shape[1]:
                raise ValueError(f"coded codes decode to {codes.dtype} {tuple(codes.shape)}, expected uint8 {shape}")
            if codes.numel() and int(codes.max()) >= 1 << bits:
                raise ValueError(f"a coded code exceeds {bits} bits")
            return codes.reshape(shape), blob
        if meta.get("codes_coding") is not None:
            raise ValueError(f"unknown codes coding {meta['codes_coding']!r} (this tensorpress reads {CODED!r})")
        return unpack_bits(stored, bits, shape[0] * shape[1]).reshape(shape), None
