"""Peak FLOP/s by device name and precision, and the MFU formula."""
import pytest

from harness.model.flops import PEAK_FLOPS, mfu, peak_flops

T = 1e12


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989, 494.7),  # SXM
    ("NVIDIA H100 NVL", 835, 417.5),  # not the SXM peak
    ("NVIDIA H100 PCIe", 756, 378),
    ("NVIDIA H100 PCIE", 756, 378),  # case does not matter
    ("NVIDIA H200", 989, 494.7),
    ("NVIDIA H200 NVL", 835, 417.5),
    ("NVIDIA GH200 480GB", 989, 494.7),
    ("NVIDIA A100-SXM4-80GB", 312, 156),
    ("NVIDIA A100-PCIE-40GB", 312, 156),
    ("NVIDIA A10G", 70, 35),  # AWS's A10 variant: not the A10's 125
    ("NVIDIA A10", 125, 62.5),
    ("NVIDIA L4", 121, 60),
    ("NVIDIA L40S", 362.05, 183),  # not the L4's
    ("NVIDIA L40", 181.05, 90.5),
])
def test_dense_peaks_by_name_and_precision(name, bf16, fp32):
    assert peak_flops(name, "bf16") == pytest.approx(bf16 * T)
    assert peak_flops(name, "fp16") == peak_flops(name, "bf16")  # same tensor-core rate
    assert peak_flops(name, "fp32") == pytest.approx(fp32 * T)  # TF32, dense


def test_the_brief_s_reference_numbers():
    assert peak_flops("NVIDIA H100 NVL", "bf16") == 835e12  # not the SXM's 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(494.7e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(156e12)


def test_v100_has_fp16_but_no_bf16_tensor_cores():
    assert peak_flops("Tesla V100-SXM2-16GB", "fp16") == pytest.approx(125e12)
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    assert peak_flops("Tesla V100-SXM2-16GB", "fp32") == pytest.approx(15.7e12)


def test_unknown_device_and_precision():
    assert peak_flops("NVIDIA GeForce RTX 3090", "bf16") is None
    assert peak_flops("AMD Instinct MI300X", "fp32") is None
    with pytest.raises(ValueError, match="precision"):
        peak_flops("NVIDIA H100 80GB HBM3", "fp8")


def test_specific_names_come_before_the_names_they_contain():
    patterns = [p.lower() for p, _ in PEAK_FLOPS]
    for i, shorter in enumerate(patterns):  # "H100" listed before "H100 NVL" would shadow it
        assert not any(p.startswith(shorter + " ") for p in patterns[i + 1:]), shorter


def test_mfu_formula():
    # harness.model.flops docstring: GPT-2 small at 400k tokens/s on 8 H100 SXMs
    assert mfu(855_166_464, 400_000, 8, 989e12) == pytest.approx(0.0432, abs=1e-4)
    assert mfu(1e9, 1e3, 1, 1e12) == pytest.approx(1.0)
