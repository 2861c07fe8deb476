"""Edit distance, error rate, the differentiable edit distance and CTC."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from losses import sequence as S

FAST = settings(max_examples=30, deadline=None)
seqs = st.lists(st.integers(0, 2), min_size=0, max_size=5)


def levenshtein(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, z in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != z)))
        prev = cur
    return prev[-1]


def pad(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in batch))
    out = torch.full((len(batch), width), 7)  # 7: padding value that matches nothing
    for i, s in enumerate(batch):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, torch.tensor([len(s) for s in batch])


@FAST
@given(st.lists(st.tuples(seqs, seqs), min_size=1, max_size=4))
def test_batched_edit_distance_equals_loop(pairs):
    hyp, hl = pad([a for a, _ in pairs])
    ref, rl = pad([b for _, b in pairs])
    got = S.edit_distance(hyp, ref, hl, rl).tolist()
    assert got == [levenshtein(a, b) for a, b in pairs]


@FAST
@given(seqs, seqs.filter(lambda s: len(s) > 0))
def test_soft_edit_distance_tends_to_exact_on_one_hot(a, b):
    hyp, hl = pad([a])
    ref, rl = pad([b])
    log_probs = torch.log(F.one_hot(hyp.clamp(max=2), 3).double().clamp_min(1e-30))
    exact = levenshtein(a, b)
    previous = None
    for temperature in (0.3, 0.03, 1e-3):
        soft = S.soft_edit_distance(log_probs, ref, hl, rl, temperature).item()
        assert soft <= exact + 1e-9  # the soft minimum lies below the minimum
        if previous is not None:
            assert abs(soft - exact) <= abs(previous - exact) + 1e-9
        previous = soft
    assert previous == pytest.approx(exact, abs=1e-3 * 3 * (len(a) + len(b) + 1))


def test_error_rate_corpus_and_rows():
    hyp = torch.tensor([[1, 2, 3], [4, 4, 4]])
    ref = torch.tensor([[1, 3, 3, 9], [4, 4, 0, 0]])
    rl = torch.tensor([4, 2])
    torch.testing.assert_close(S.error_rate(hyp, ref, None, rl), torch.tensor([2 / 4, 1 / 2]))
    assert S.error_rate(hyp, ref, None, rl, reduction="mean").item() == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="empty reference"):
        S.error_rate(hyp, ref, None, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="lengths"):
        S.edit_distance(hyp, ref, torch.tensor([5, 1]))


def test_soft_edit_distance_gradcheck_and_module():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2], [3, 0]])
    lengths = torch.tensor([3, 2])
    assert gradcheck(
        lambda z: S.soft_edit_distance(z.log_softmax(2), targets, lengths, None, 0.5), (logits,)
    )
    loss = S.SoftEditDistanceLoss(temperature=0.5, reduction="none")
    value = loss(logits.log_softmax(2), targets, lengths)
    assert value.shape == (2,) and (value >= 0).all() and torch.isfinite(value).all()
    with pytest.raises(ValueError, match="temperature"):
        S.SoftEditDistanceLoss(temperature=0.0)
    with pytest.raises(ValueError, match="empty"):
        loss(torch.empty(0, 3, 4), torch.empty(0, 2, dtype=torch.long))


def test_ctc_equals_torch_and_zero_infinity():
    log_probs = torch.randn(6, 2, 4, dtype=torch.float64).log_softmax(2)
    targets = torch.tensor([[1, 2, 2], [3, 1, 0]])
    il, tl = torch.tensor([6, 5]), torch.tensor([3, 2])
    torch.testing.assert_close(
        S.CTCLoss()(log_probs, targets, il, tl), F.ctc_loss(log_probs, targets, il, tl)
    )
    too_short = S.CTCLoss(zero_infinity=True, reduction="none")(
        log_probs, targets, torch.tensor([2, 5]), tl
    )
    assert too_short[0].item() == 0.0 and too_short[1].item() > 0
