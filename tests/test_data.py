import pytest
import torch

from sizewise import data
from sizewise.errors import SizewiseError


def test_calibration_samples_are_seeded_slices():
    tokens = torch.arange(1000)
    a = data.calibration_samples(tokens, 8, 50, seed=3)
    assert a.shape == (8, 50)
    assert torch.equal(a, data.calibration_samples(tokens, 8, 50, seed=3))
    assert not torch.equal(a, data.calibration_samples(tokens, 8, 50, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 49, dtype=torch.long))   # contiguous runs


def test_calibration_text_too_short():
    with pytest.raises(SizewiseError, match="fewer than one sample"):
        data.calibration_samples(torch.arange(10), 2, 50, 0)


def test_non_overlapping_windows_score_ctx_minus_one_tokens():
    w = data.eval_windows(torch.arange(100), ctx=10)
    assert len(w.inputs) == 10 and w.tokens_scored == 10 * 9
    assert torch.equal(w.inputs[3][0], torch.arange(30, 40))


def test_strided_windows_score_every_token_once():
    tokens = torch.arange(100)
    w = data.eval_windows(tokens, ctx=10, stride=5)
    scored = []
    for x, first in zip(w.inputs, w.score_from):
        scored += x[0, first + 1:].tolist()
    assert scored == list(range(1, 100)) and w.tokens_scored == 99


def test_bos_windows_score_the_first_token_too():
    w = data.eval_windows(torch.arange(5, 25), ctx=10, bos=1)
    assert w.inputs[0][0, 0].item() == 1 and w.inputs[0].shape[1] == 11
    assert w.tokens_scored == 20


def test_text_shorter_than_one_window():
    with pytest.raises(SizewiseError, match="shorter than one window of 1024"):
        data.eval_windows(torch.arange(100), ctx=1024)


def test_too_many_windows():
    with pytest.raises(SizewiseError, match="asked for 11 windows"):
        data.eval_windows(torch.arange(100), ctx=10, count=11)


def test_read_text_errors(tmp_path):
    with pytest.raises(SizewiseError, match="no text file"):
        data.read_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(SizewiseError, match="not UTF-8"):
        data.read_text(bad)


def test_read_text_records_hash(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello")
    t = data.read_text(p)
    assert t.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
