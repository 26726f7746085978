"""Packed storage of unsigned low-bit weight codes (2, 3, 4 or 8 bits) and the matching dequantization.

Format version `PACKING_FORMAT_VERSION` (1). Codes `q ∈ [0, 2^bits − 1]` of a weight `(N, K) = (out, in)` are
packed row by row into int32 words along K, after padding K with zero codes to a multiple of 32, so every row
holds `bits · ceil(K / 32)` words and `qweight` has shape `(N, bits · ceil(K / 32))`:

- bits ∈ {2, 4, 8}: word `w` of a row holds the `32 / bits` values `k = w · (32 / bits) + j` at bit offset
  `j · bits`, little end first (GemLite's layout, K-major as `nn.Linear` stores its weight).
- bits = 3: two bit planes side by side in one row. Words `[0, KW)` (`KW = ceil(K / 32)`) hold bit 0 of each
  code, value `k` at word `k // 32`, bit `k % 32`; words `[KW, 3·KW)` hold `q >> 1` packed like 2-bit codes.
  Every field then sits at a power-of-two position, which the kernels unpack with one shift and one mask.

Group parameters (`scale`, `zero`: float16) dequantize as `w = (q − zero) · scale`, computed in fp32.
`group_dim="oc"`: a group is `group_size` consecutive input channels of one output row, parameters
`(N, ceil(K / g))` indexed `[n, k // g]`; `group_dim="ic"`: `group_size` consecutive output channels of one
input column, parameters `(ceil(N / g), K)` indexed `[n // g, k]`. The last group may be ragged. `group_size`
is a power of two in [16, 1024] or the whole grouped dimension (one group per row or column).
"""

from __future__ import annotations

import torch

PACKING_FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
GROUP_DIMS = ("oc", "ic")
WORD_BITS = 32


def words_per_row(bits: int, in_features: int) -> int:
    """int32 words a packed row of `in_features` codes takes: `bits · ceil(K / 32)`."""
    check_bits(bits)
    return bits * -(-in_features // WORD_BITS)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {list(SUPPORTED_BITS)}.")


def _pack_fields(codes: torch.Tensor, field_bits: int) -> torch.Tensor:
    """Pack `(N, Kp)` codes of `field_bits` bits (Kp a multiple of 32) into int32 words, little end first."""
    n, kp = codes.shape
    per_word = WORD_BITS // field_bits
    fields = codes.to(torch.int64).view(n, kp // per_word, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * field_bits
    words = (fields << shifts).sum(dim=-1)  # < 2^32, exact in int64
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's-complement wrap to int32


def _unpack_fields(words: torch.Tensor, field_bits: int) -> torch.Tensor:
    """Inverse of `_pack_fields`: `(N, W)` int32 words to `(N, W · 32 / field_bits)` int64 fields."""
    per_word = WORD_BITS // field_bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * field_bits
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    fields = (unsigned[..., None] >> shifts) & ((1 << field_bits) - 1)
    return fields.reshape(words.shape[0], -1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes `(N, K)` into int32 `(N, bits · ceil(K / 32))` (see the module docstring)."""
    check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be a 2-D integer tensor (N, K), got {_describe(codes)}")
    if codes.dtype == torch.bool:
        raise TypeError("codes must be an integer tensor, got torch.bool")
    n, k = codes.shape
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > 2**bits - 1:
            raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}, got values in [{lo}, {hi}]")
    kp = -(-k // WORD_BITS) * WORD_BITS
    padded = torch.zeros((n, kp), dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes
    if bits == 3:
        return torch.cat([_pack_fields(padded & 1, 1), _pack_fields(padded >> 1, 2)], dim=1)
    return _pack_fields(padded, bits)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The codes `(N, K)` as uint8: the exact inverse of `pack_codes`."""
    check_packed(packed, bits, in_features)
    kw = -(-in_features // WORD_BITS)
    if bits == 3:
        q = _unpack_fields(packed[:, :kw], 1) | (_unpack_fields(packed[:, kw:], 2) << 1)
    else:
        q = _unpack_fields(packed, bits)
    return q[:, :in_features].to(torch.uint8)


def check_packed(packed: torch.Tensor, bits: int, in_features: int) -> None:
    check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2 or packed.dtype != torch.int32:
        raise TypeError(f"packed weights must be a 2-D int32 tensor (N, words), got {_describe(packed)}")
    if not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    want = words_per_row(bits, in_features)
    if packed.shape[1] != want:
        raise ValueError(
            f"packed weights have {packed.shape[1]} words a row, but {bits}-bit codes of in_features={in_features} "
            f"take bits·ceil(K/32) = {want}; pass the in_features the weight was packed with"
        )


def group_params_shape(out_features: int, in_features: int, group_size: int, group_dim: str) -> tuple[int, int]:
    """Shape of `scale` / `zero`: `(N, ceil(K/g))` for "oc", `(ceil(N/g), K)` for "ic"."""
    if group_dim == "oc":
        return out_features, -(-in_features // group_size)
    if group_dim == "ic":
        return -(-out_features // group_size), in_features
    raise ValueError(f"group_dim={group_dim!r} is invalid; allowed values: {list(GROUP_DIMS)}")


def check_group_params(
    scale: torch.Tensor, zero: torch.Tensor, group_size: int, group_dim: str, out_features: int, in_features: int
) -> None:
    """Validate the group layout and the shapes and dtypes of `scale` and `zero` (clear errors, no fix-ups)."""
    if group_dim not in GROUP_DIMS:
        raise ValueError(f"group_dim={group_dim!r} is invalid; allowed values: {list(GROUP_DIMS)}")
    grouped = in_features if group_dim == "oc" else out_features
    power_of_two = isinstance(group_size, int) and group_size > 0 and group_size & (group_size - 1) == 0
    if not isinstance(group_size, int) or not (
        (power_of_two and 16 <= group_size <= 1024) or group_size == grouped
    ):
        raise ValueError(
            f"group_size={group_size!r} is invalid for group_dim={group_dim!r}: use a power of two in [16, 1024] "
            f"or the whole grouped dimension ({grouped})"
        )
    want = group_params_shape(out_features, in_features, group_size, group_dim)
    for name, t in (("scale", scale), ("zero", zero)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float16:
            raise TypeError(f"{name} must be a float16 tensor, got {_describe(t)}")
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, but group_dim={group_dim!r} with group_size={group_size} "
                f"and a weight of (out, in) = ({out_features}, {in_features}) needs {want}"
            )


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    group_dim: str,
    in_features: int,
) -> torch.Tensor:
    """The fp32 weight `(N, K)`: `(q − zero) · scale` with the group parameters expanded per layout."""
    check_packed(packed, bits, in_features)
    n = packed.shape[0]
    check_group_params(scale, zero, group_size, group_dim, n, in_features)
    q = unpack_codes(packed, bits, in_features).float()
    dim = 1 if group_dim == "oc" else 0
    s = scale.float().repeat_interleave(group_size, dim=dim)[:n, :in_features]
    z = zero.float().repeat_interleave(group_size, dim=dim)[:n, :in_features]
    return (q - z) * s


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
