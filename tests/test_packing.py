"""qrunner.quant.packing: round trips, literal words, and bit-for-bit parity with AutoRound's packers."""

from __future__ import annotations

import pytest
import torch

from qrunner.quant.packing import pack_cols, pack_rows, packed_size, unpack_cols, unpack_rows


def _u32(x: int) -> int:
    """Signed int32 value of an unsigned 32-bit pattern."""
    return x - (1 << 32) if x >= (1 << 31) else x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_rows_and_cols(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 64), generator=g, dtype=torch.int32)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 64) and packed.is_contiguous()
    assert torch.equal(unpack_rows(packed, bits), codes)
    packed_c = pack_cols(codes, bits)
    assert packed_c.dtype == torch.int32 and packed_c.shape == (96, 64 * bits // 32) and packed_c.is_contiguous()
    assert torch.equal(unpack_cols(packed_c, bits), codes)
    # packing along columns is packing the transpose along rows
    assert torch.equal(packed_c, pack_rows(codes.t(), bits).t())


def test_extreme_codes_round_trip():
    for bits in (2, 3, 4, 8):
        ones = torch.full((32, 3), 2**bits - 1, dtype=torch.uint8)
        assert torch.equal(pack_rows(ones, bits), torch.full((bits, 3), -1, dtype=torch.int32))  # all bits set
        assert torch.equal(unpack_rows(pack_rows(ones, bits), bits), ones.int())


def test_4bit_literal_word():
    codes = torch.arange(1, 9, dtype=torch.int32)  # value j at bits [4j, 4j+4)
    assert pack_rows(codes.reshape(8, 1), 4).item() == _u32(0x87654321)
    assert pack_cols(codes.reshape(1, 8), 4).item() == _u32(0x87654321)
    assert unpack_rows(torch.tensor([[_u32(0x87654321)]], dtype=torch.int32), 4).flatten().tolist() == list(range(1, 9))


def test_2bit_and_8bit_literal_words():
    two = torch.tensor([1, 2, 3, 0] * 4, dtype=torch.int32).reshape(16, 1)  # 0b00_11_10_01 per byte
    assert pack_rows(two, 2).item() == 0x39393939
    eight = torch.tensor([0x01, 0x7F, 0x80, 0xFF], dtype=torch.int32).reshape(4, 1)
    assert pack_rows(eight, 8).item() == _u32(0xFF807F01)


def test_3bit_values_straddle_word_boundaries():
    # 32 three-bit values fill 3 words; value 10 spans bits 30..32, value 21 bits 63..65.
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10] = 0b111
    assert pack_rows(codes, 3).flatten().tolist() == [_u32(0xC0000000), 0x1, 0x0]
    codes.zero_()
    codes[21] = 0b111
    assert pack_rows(codes, 3).flatten().tolist() == [0x0, _u32(0x80000000), 0x3]
    codes.zero_()
    codes[0], codes[11], codes[22], codes[31] = 5, 3, 6, 7
    # word0: 5 at bit 0; word1: 3 at bit 1; word2: 6 at bit 2, 7 at bit 29
    assert pack_rows(codes, 3).flatten().tolist() == [5, 3 << 1, (6 << 2) | _u32(7 << 29)]


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[16]] * 8), 4)  # out of range
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[-1]] * 8), 4)
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(12, 2, dtype=torch.int32), 4)  # 12 values do not fill whole words
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(16, 2, dtype=torch.int32), 3)  # 3-bit needs blocks of 32
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(8, 2), 4)  # float codes
    with pytest.raises(ValueError):
        unpack_rows(torch.zeros(2, 2, dtype=torch.int64), 4)
    assert packed_size(128, 3) == 12 and packed_size(128, 4) == 16


@pytest.mark.filterwarnings("ignore::UserWarning")  # auto_round's own 3-bit packer warns
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_auto_round_quantlinear_packing(bits):
    """qweight/qzeros identical to auto_round_extension's QuantLinear.pack (GPTQ v1 and raw zero)."""
    torch_ext = pytest.importorskip("auto_round_extension.torch.qlinear_torch")
    torch_zp_ext = pytest.importorskip("auto_round_extension.torch.qlinear_torch_zp")
    g = torch.Generator().manual_seed(100 + bits)
    out_f, in_f, gs = 64, 128, 32
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, maxq + 1, (out_f, in_f // gs), generator=g, dtype=torch.int32)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    # with scale 1, AutoRound's packer recovers round(W / 1 + zero) = codes
    linear.weight.data = (codes - zeros.repeat_interleave(gs, dim=1)).float()
    scales = torch.ones(out_f, in_f // gs)
    for module, offset in ((torch_ext, 0), (torch_zp_ext, 1)):
        layer = module.QuantLinear(bits, gs, in_f, out_f, bias=False)
        layer.device = torch.device("cpu")
        layer.pack(linear, scales, zeros.float(), None)
        assert torch.equal(layer.qweight, pack_rows(codes.t(), bits))
        assert torch.equal(layer.qzeros, pack_cols((zeros - offset).t(), bits))
