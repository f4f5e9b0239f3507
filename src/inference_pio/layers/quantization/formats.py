"""Weight formats as plain-torch quantize / dequantize functions: the reference every kernel
matches. All work on one 2-D weight [rows, cols] (rows = output features), row by row, so a
stacked expert tensor [E, rows, ...] is a stack of independent weights.

Layouts (what `pio quantize` writes and every kernel reads):
- int8: `qweight` int8 [rows, cols], `scales` float32 [rows]; w = q * scale, scale = absmax/127.
- int4: `qweight` uint8 [rows, cols_p/2], `scales` float16 [rows, cols_p/group]; cols_p is cols
  rounded up to a multiple of max(64, group) (pad is zero). Within each 64-column block, byte i
  holds column i in its low nibble and column i+32 in its high nibble (one 32-byte AVX2 load
  unpacks to two runs of 32 consecutive columns). A nibble n means q = n - 8, w = q * scale;
  scale = (the group's value of largest magnitude) / -8, so that value maps to q = -8 exactly
  (llama.cpp Q4_0's rule), q clamped to [-8, 7].
- nf4: same packing as int4; a nibble indexes NF4_CODE (bitsandbytes' NormalFloat-4 code book);
  `absmax` float32 [rows, cols_p/block]; w = NF4_CODE[n] * absmax of the block.
- fp8: `weight` float8_e4m3fn [rows, cols], `weight_scale_inv` float32
  [ceil(rows/B), ceil(cols/B)] with B = 128 (Qwen's and DeepSeek's FP8 checkpoints):
  w = fp8 * scale_inv of its BxB block.
"""

from __future__ import annotations

import itertools

import torch

PACK_BLOCK = 64  # columns per packing block of the 4-bit formats
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# bitsandbytes' NF4 code book (QLoRA, Dettmers et al. 2023), index = 4-bit code.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_NF4_CUTS = tuple((a + b) / 2 for a, b in itertools.pairwise(NF4_CODE))


def padded_cols(cols: int, group: int) -> int:
    """Columns a 4-bit row stores: cols rounded up to a multiple of max(PACK_BLOCK, group)."""
    step = max(PACK_BLOCK, group)
    return -(-cols // step) * step


def _pad_cols(w: torch.Tensor, cols_p: int) -> torch.Tensor:
    w = w.float()
    if w.shape[-1] == cols_p:
        return w
    return torch.nn.functional.pad(w, (0, cols_p - w.shape[-1]))


# ---- nibble packing ---------------------------------------------------------------------

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 in [0, 16) of shape [..., cols_p] (cols_p % 64 == 0) -> [..., cols_p/2]:
    byte i of each 64-column block = code[i] | code[i+32] << 4."""
    blocks = codes.to(torch.uint8).unflatten(-1, (-1, PACK_BLOCK))
    packed = blocks[..., :32] | (blocks[..., 32:] << 4)
    return packed.flatten(-2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: [..., cols_p/2] uint8 -> codes [..., cols_p] uint8."""
    blocks = packed.unflatten(-1, (-1, PACK_BLOCK // 2))
    codes = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1)
    return codes.flatten(-2)


# The AVX-512 VNNI kernels' tile order (csrc/int4_vnni.h, int8_vnni.h): per 16 rows (a
# contiguous run of 16 x bytes-per-row) and block b of 32 bytes a row (64 int4 columns, 32 int8
# ones), the kernels want 8 vectors X[j] of 64 bytes, lane i holding bytes 4j..4j+3 of the
# block in row VNNI_LANE_ROWS[i]. Stored in that order (a permutation within each 16-row tile:
# same shape, same bytes), the kernels load them instead of transposing 16 rows in registers
# (32 shuffles a block).
VNNI_LANE_ROWS = (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)  # self-inverse


def pack_vnni(qweight: torch.Tensor) -> torch.Tensor:
    """An int4 or int8 qweight [..., rows, bytes] (rows a multiple of 16, bytes of 32) -> the
    same bytes in the VNNI tile order, same shape and dtype."""
    *lead, rows, width = qweight.shape
    if rows % 16 or width % 32:
        raise ValueError(f"VNNI tiles need rows in multiples of 16 and rows of whole 32-byte "
                         f"blocks, got [{rows}, {width}]")
    t = qweight.reshape(*lead, rows // 16, 16, width // 32, 8, 4)
    t = t.index_select(-4, torch.tensor(VNNI_LANE_ROWS))  # [.., tile, lane, block, j, byte]
    return t.movedim(-4, -2).reshape(qweight.shape)       # [.., tile, block, j, lane, byte]


def unpack_vnni(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_vnni."""
    *lead, rows, width = packed.shape
    t = packed.reshape(*lead, rows // 16, width // 32, 8, 16, 4).movedim(-2, -4)
    return t.index_select(-4, torch.tensor(VNNI_LANE_ROWS)).reshape(packed.shape)


# ---- int8 -------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scales = w.abs().amax(dim=-1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def dequantize_int8(parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
    return parts["qweight"].float() * parts["scales"].float()[..., None]


# ---- int4 -------------------------------------------------------------------------------

def quantize_int4(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    groups = _pad_cols(w, padded_cols(w.shape[-1], group)).unflatten(-1, (-1, group))
    idx = groups.abs().argmax(dim=-1, keepdim=True)
    scales = (groups.gather(-1, idx) / -8.0).squeeze(-1).to(torch.float16)
    s = scales.float()[..., None]
    safe = torch.where(s != 0, s, torch.ones_like(s))
    q = torch.round(groups / safe).clamp_(-8, 7)
    codes = (q + 8).to(torch.uint8).flatten(-2)
    return {"qweight": pack_nibbles(codes), "scales": scales}


def dequantize_int4(parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
    codes = unpack_nibbles(parts["qweight"])
    scales = parts["scales"].float()
    group = codes.shape[-1] // scales.shape[-1]
    q = (codes.float() - 8.0).unflatten(-1, (-1, group))
    return (q * scales[..., None]).flatten(-2)[..., :cols]


# ---- nf4 --------------------------------------------------------------------------------

def quantize_nf4(w: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    blocks = _pad_cols(w, padded_cols(w.shape[-1], block)).unflatten(-1, (-1, block))
    absmax = blocks.abs().amax(dim=-1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))[..., None]
    cuts = torch.tensor(_NF4_CUTS, dtype=torch.float32, device=w.device)
    codes = torch.bucketize(blocks / safe, cuts).to(torch.uint8).flatten(-2)
    return {"qweight": pack_nibbles(codes), "absmax": absmax}


def dequantize_nf4(parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
    codes = unpack_nibbles(parts["qweight"])
    absmax = parts["absmax"].float()
    block = codes.shape[-1] // absmax.shape[-1]
    table = torch.tensor(NF4_CODE, dtype=torch.float32, device=codes.device)
    values = table[codes.long()].unflatten(-1, (-1, block))
    return (values * absmax[..., None]).flatten(-2)[..., :cols]


# ---- fp8 (block scales) -----------------------------------------------------------------

def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    full = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return full[..., :rows, :cols]


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> dict[str, torch.Tensor]:
    """Per-BxB-block absmax scaling to float8_e4m3fn (how FP8 test checkpoints are made)."""
    w = w.float()
    rows, cols = w.shape[-2:]
    rp, cp = -(-rows // block) * block, -(-cols // block) * block
    padded = torch.nn.functional.pad(w, (0, cp - cols, 0, rp - rows))
    tiles = padded.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # [..., R, B, C, B]
    scale_inv = tiles.abs().amax(dim=(-3, -1)) / FP8_MAX
    scale_inv = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))
    q = (w / _expand_blocks(scale_inv, rows, cols, block)).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": scale_inv}


def dequantize_fp8(parts: dict[str, torch.Tensor], cols: int, block: int = FP8_BLOCK
                   ) -> torch.Tensor:
    q = parts["weight"]
    scale = parts["weight_scale_inv"].float()
    rows = q.shape[-2]
    grid = (-(-rows // block), -(-cols // block))
    if tuple(scale.shape[-2:]) != grid:
        raise ValueError(f"weight_scale_inv has shape {list(scale.shape)}, a [{rows}, {cols}] "
                         f"weight with {block}x{block} blocks needs {list(grid)}")
    return q.float() * _expand_blocks(scale, rows, cols, block)
