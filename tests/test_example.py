"""The README's Python walk-through (`python -m paretoq_ao.example`) runs end to end."""

from paretoq_ao import example


def test_example_runs_and_packed_model_reproduces_qat(capsys):
    res = example.main(["--bits", "2", "--pretrain-steps", "3", "--qat-steps", "2"])
    out = capsys.readouterr().out
    # packed logits == QAT fake-quantized logits up to float summation order (the C++ CPU kernels
    # accumulate in another order than the dequantize + matmul of the QAT forward)
    assert res["diff"] < 1e-4
    assert all(v > 1.0 for k, v in res.items() if k != "diff")
    assert "ParetoQ QAT 2-bit" in out and "RTN 2-bit" in out
