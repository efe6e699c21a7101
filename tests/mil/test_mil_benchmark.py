"""The MIL benchmark: digit bags follow the MNIST-bags protocol, AUC matches scikit-learn, a short
training run learns, and ``mixattn mil`` writes its table, JSON and heatmap."""

import json

import pytest
import torch

pytest.importorskip("sklearn")

from mixattn.cli import main  # noqa: E402
from mixattn.mil import BagsConfig, MILClassifier, MILTrainConfig, bag_auc, evaluate, make_bags, train_mil  # noqa: E402


def test_bags_follow_the_protocol():
    cfg = BagsConfig(target=3, bag_mean=6, bag_std=2, train_bags=40, test_bags=30, positive_rate=0.25)
    train, test = make_bags(cfg, seed=1)
    for bags, n in ((train, 40), (test, 30)):
        assert len(bags) == n and int(bags.y.sum()) == round(n * 0.25)
        has_target = ((bags.digits == 3) & bags.mask).any(1).long()
        torch.testing.assert_close(bags.y, has_target)  # positive iff the target digit is in the bag
        assert bags.mask.sum(1).min() >= 1
        assert (bags.digits[~bags.mask] == -1).all() and (bags.x[~bags.mask] == 0).all()
        assert 0 <= float(bags.x.min()) and float(bags.x.max()) <= 1
    again, _ = make_bags(cfg, seed=1)
    torch.testing.assert_close(again.x, train.x)
    other, _ = make_bags(cfg, seed=2)
    assert other.x.shape != train.x.shape or not torch.equal(other.x, train.x)


def test_train_and_test_bags_use_disjoint_images():
    train, test = make_bags(BagsConfig(train_bags=60, test_bags=60), seed=0)
    a = {tuple(r.tolist()) for r in train.x[train.mask]}
    b = {tuple(r.tolist()) for r in test.x[test.mask]}
    assert not a & b


def test_bag_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    s = torch.randint(0, 10, (200,), generator=g).float()  # ties included
    assert bag_auc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-9)
    with pytest.raises(ValueError, match="both"):
        bag_auc(s, torch.ones(200, dtype=torch.long))


@pytest.mark.parametrize("method", ["abmil", "mba_stkim"])
def test_short_training_learns(method):
    torch.manual_seed(0)
    train, test = make_bags(BagsConfig(train_bags=80, test_bags=100), seed=0)
    model = MILClassifier(64, MILTrainConfig(method=method, epochs=15, lr=2e-3))
    history = train_mil(model, train, seed=0)
    assert history[-1] < 0.8 * history[0]
    if method == "abmil":  # STKIM and the diversity term slow learning down: 15 epochs are not enough to test AUC
        assert evaluate(model, test)["auc"] > 0.8


def test_cli_mil_writes_table_json_and_heatmap(tmp_path, capsys):
    out = tmp_path / "mil"
    rc = main(["mil", "--out", str(out), "--seeds", "2", "--epochs", "2", "--train-bags", "20",
               "--test-bags", "20", "--methods", "abmil,mba_stkim"])  # fmt: skip
    assert rc == 0
    assert "MBA+STKIM" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["seed"], r["method"]) for r in rows} == {(s, m) for s in (0, 1) for m in ("abmil", "mba_stkim")}
    assert "n = 2 seeds" in (out / "results.md").read_text()
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_mil_rejects_bad_input_before_training(tmp_path, capsys):
    for args in (["--methods", "abmil,foo"], ["--target", "11"], ["--mask-rate", "1"]):
        assert main(["mil", "--out", str(tmp_path / "x"), *args]) == 2
        assert "error" in capsys.readouterr().err
        assert not (tmp_path / "x" / "results.json").exists()
