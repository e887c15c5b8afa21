"""Losses: gradients reach every term, SAT soft labels update only where they should,
class weights (sat_boost) are applied."""

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

import torch.nn.functional as F  # noqa: E402

from nexedge.train.losses import DEFAULT_BOOST, SATLoss, TrainLoss, WBCELoss, build_loss, parse_class_map  # noqa: E402

CLASSES = ["chipping", "good", "lead_defect", "scratch"]
G = 1


def _batch(n=6, c=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, requires_grad=True)
    targets = torch.tensor([1, 0, 1, 2, 3, 1][:n])
    return logits, targets, torch.arange(n)


def test_ce_with_class_weights_equals_torch():
    logits, y, idx = _batch()
    w = [1.0, 1.0, 5.0, 2.0]
    ours = TrainLoss(4, G, w)(logits, y, idx, 1)
    ref = F.cross_entropy(logits, y, weight=torch.tensor(w))
    torch.testing.assert_close(ours, ref)


def test_wbce_binary_term_is_live_and_matches_formula():
    logits, y, idx = _batch()
    loss = WBCELoss(4, G, lam=0.0)
    out = loss(logits, y, idx, 1)
    p = F.softmax(logits, 1)
    p_def = p[:, [0, 2, 3]].sum(1)
    ref = -torch.where(y == G, torch.log(p[:, G]), torch.log(p_def)).mean()
    torch.testing.assert_close(out, ref)
    (g_bin,) = torch.autograd.grad(out, logits)
    assert g_bin.abs().sum() > 0
    # lambda = 0.5: gradient is the mix of both terms, not a rescaled CE gradient.
    mixed = WBCELoss(4, G, lam=0.5)(logits, y, idx, 1)
    (g_mix,) = torch.autograd.grad(mixed, logits)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    torch.testing.assert_close(g_mix, 0.5 * g_ce + 0.5 * g_bin)
    assert not torch.allclose(g_mix, 0.5 * g_ce, atol=1e-4)


def test_wbce_binary_equals_ce_for_two_classes():
    logits = torch.randn(5, 2)
    y = torch.tensor([0, 1, 1, 0, 1])
    ce, bce = WBCELoss(2, 0).terms(logits, y)
    torch.testing.assert_close(ce, bce)


def test_wbce_per_class_start_epochs():
    logits, y, idx = _batch()
    loss = build_loss("wbce", y, CLASSES, "good", wbce_lambda=0.3, wbce_start={"scratch": 5})
    ce, bce = loss.terms(logits, y)
    out = loss(logits, y, idx, 3)  # scratch (index 3) still plain CE at epoch 3
    per = torch.where(y == 3, ce, 0.3 * ce + 0.7 * bce)
    torch.testing.assert_close(out, per.mean())
    out5 = loss(logits, y, idx, 5)
    torch.testing.assert_close(out5, (0.3 * ce + 0.7 * bce).mean())


def test_sat_is_ce_until_es_then_updates_only_batch_rows():
    labels = torch.tensor([1, 0, 1, 2, 3, 1, 0, 2])
    loss = SATLoss(labels, 4, G, alpha=0.9, es=2)
    logits, y, _ = _batch()
    idx = torch.tensor([0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(loss(logits, y, idx, 2), F.cross_entropy(logits, y))
    assert torch.equal(loss.soft, F.one_hot(labels, 4).float())
    out = loss(logits, y, idx, 3)
    p = F.softmax(logits.detach(), 1)
    expected = 0.9 * F.one_hot(y, 4).float() + 0.1 * p
    torch.testing.assert_close(loss.soft[:6], expected)
    assert torch.equal(loss.soft[6:], F.one_hot(labels[6:], 4).float())  # not in the batch
    w = expected.max(1).values
    per = -(expected * F.log_softmax(logits, 1)).sum(1)
    torch.testing.assert_close(out, (w * per).sum() / w.sum())
    (grad,) = torch.autograd.grad(out, logits)
    assert grad.abs().sum() > 0
    assert loss.touched[:6].all() and not loss.touched[6:].any()
    loss.sync()  # single process: just clears the marks
    assert not loss.touched.any()


def test_sat_good_updates_only_good_rows():
    logits, y, idx = _batch()
    loss = build_loss("sat_good", y, CLASSES, "good", sat_es=0)
    loss(logits, y, idx, 1)
    onehot = F.one_hot(y, 4).float()
    good = y == G
    assert not torch.allclose(loss.soft[good], onehot[good])
    assert torch.equal(loss.soft[~good], onehot[~good])


def test_sat_boost_default_weights_only_for_present_classes():
    labels = torch.tensor([0, 1, 2, 3])
    loss = build_loss("sat_boost", labels, CLASSES, "good")
    assert loss.class_weights.tolist() == [1.0, 1.0, 5.0, 5.0]  # lead_defect, scratch present
    assert set(DEFAULT_BOOST) >= {"lead_defect", "scratch", "marking_defect", "pocket_damage"}
    other = build_loss("sat_boost", torch.tensor([0, 1]), ["good", "bad"], "good")
    assert other.class_weights.tolist() == [1.0, 1.0]


def test_sat_boost_weights_enter_the_loss():
    logits, y, idx = _batch()
    loss = build_loss("sat_boost", y, CLASSES, "good", sat_es=0)
    out = loss(logits, y, idx, 1)
    t = loss.soft[idx]
    w = t.max(1).values * torch.tensor([1.0, 1.0, 5.0, 5.0])[y]
    per = -(t * F.log_softmax(logits, 1)).sum(1)
    torch.testing.assert_close(out, (w * per).sum() / w.sum())
    plain = build_loss("sat_good", y, CLASSES, "good", sat_es=0)(logits, y, idx, 1)
    assert not torch.allclose(out, plain)


def test_custom_boost_and_errors():
    loss = build_loss("ce", [0, 1], CLASSES, "good", boost=parse_class_map(["chipping=3"], CLASSES, "--boost"))
    assert loss.class_weights.tolist() == [3.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="'pocket' is not one of"):
        parse_class_map(["pocket=2"], CLASSES, "--boost")
    with pytest.raises(ValueError, match="expected CLASS=VALUE"):
        parse_class_map(["scratch"], CLASSES, "--boost")
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        build_loss("focal", [0], CLASSES, "good")
    with pytest.raises(ValueError, match="--loss-kw sat_alpha"):
        build_loss("sat", [0], CLASSES, "good", sat_alpha=1.5)


def test_sat_state_roundtrip_and_shape_check():
    loss = build_loss("sat", [0, 1, 2], CLASSES, "good", sat_es=0)
    logits, y, idx = _batch(3)
    loss(logits, y, idx, 1)
    other = build_loss("sat", [0, 1, 2], CLASSES, "good")
    other.load_state(loss.state())
    assert torch.equal(other.soft, loss.soft)
    with pytest.raises(ValueError, match="does not fit"):
        build_loss("sat", [0, 1], CLASSES, "good").load_state(loss.state())


def test_every_declared_loss_builds_and_the_cli_offers_it():
    """LOSSES is the one declaration: --loss choices and help come from it, build_loss builds each."""
    from nexedge.cli import build_parser
    from nexedge.train.losses import LOSSES

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    loss = next(a for a in sub.choices["train"]._actions if a.dest == "loss")
    assert tuple(loss.choices) == tuple(LOSSES)
    classes = ["good", "scratch", "lead_defect"]
    for name in LOSSES:
        assert f"{name}: {LOSSES[name]}" in loss.help
        built = build_loss(name, [0, 1, 2, 0], classes, "good")
        assert isinstance(built, TrainLoss) and built.name == name
        logits = torch.randn(4, 3, requires_grad=True)
        built(logits, torch.tensor([0, 1, 2, 0]), torch.arange(4), 1).backward()
        assert logits.grad is not None
