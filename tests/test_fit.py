"""coursekit.fit: the training loop, early stopping, the split, the frozen backbone, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coursekit import fit
from coursekit.guard import model_state


def _toy_data(n=240, seed=0, size=12):
    """Two easy classes (bright left half vs bright right half) plus noise: (N, 1, size, size), (N,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, size, size, generator=g)
    x[y == 0, :, :, : size // 2] += 0.5
    x[y == 1, :, :, size // 2:] += 0.5
    return x.clamp(0, 1), y


def _tiny_net(seed=0, dropout=0.0, size=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(4 * (size // 2) ** 2, 2))


class _Record(fit.Callback):
    """Keeps a copy of the weights after every epoch (before any later callback changes them)."""

    def on_train_begin(self, model, history):
        self.states = []

    def on_epoch_end(self, epoch, model, history):
        self.states.append(copy.deepcopy(model.state_dict()))
        return False


# ----------------------------------------------------------------------------------------------
# the loop


def test_loss_goes_down_and_accuracy_beats_chance():
    x, y = _toy_data()
    net = _tiny_net()
    h = fit.fit(net, (x[:160], y[:160]), (x[160:], y[160:]), epochs=6, lr=1e-2, batch_size=16, progress=False)
    assert h.epochs == 6 and len(h.val_loss) == len(h.train_acc) == 6
    assert h.train_loss[-1] < 0.5 * h.train_loss[0], h.train_loss
    assert h.val_acc[-1] > 0.9, h.val_acc
    assert all(p.grad is None for p in net.parameters()), "fit leaves no .grad behind"


def test_one_epoch_equals_a_plain_adam_loop():
    """The loop's arithmetic against the obvious implementation: same shuffle, same Adam steps."""
    x, y = _toy_data(n=100)
    net = _tiny_net(dropout=0.5)
    ref = copy.deepcopy(net)
    fit.fit(net, (x, y), (x[:10], y[:10]), epochs=1, lr=3e-3, batch_size=32, seed=7, progress=False)
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.Adam(ref.parameters(), lr=3e-3)
    torch.manual_seed(7)  # the dropout masks
    ref.train()
    order = torch.randperm(100, generator=gen)
    for i in range(0, 100, 32):
        idx = order[i:i + 32]
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_same_seed_same_history_and_global_rng_untouched():
    x, y = _toy_data()
    runs = []
    for _ in range(2):
        net = _tiny_net(dropout=0.3)
        torch.manual_seed(123)
        before = torch.rand(1)
        torch.manual_seed(123)
        h = fit.fit(net, (x, y), (x[:50], y[:50]), epochs=2, seed=3, progress=False,
                    augment=fit.FlipShift(1))
        assert torch.equal(torch.rand(1), before), "fit must not move the global random state"
        runs.append(h)
    assert runs[0].train_loss == runs[1].train_loss and runs[0].val_loss == runs[1].val_loss
    h_other = fit.fit(_tiny_net(dropout=0.3), (x, y), (x[:50], y[:50]), epochs=2, seed=4, progress=False)
    assert h_other.train_loss != runs[0].train_loss


def test_mode_is_put_back_and_validation_runs_in_eval_mode():
    x, y = _toy_data(n=80)
    net = _tiny_net(dropout=0.9).eval()
    h = fit.fit(net, (x, y), (x, y), epochs=1, progress=False)
    assert not any(m.training for m in net.modules())
    # validation numbers are eval-mode numbers: dropout 0.9 in train mode would make them random
    assert h.val_loss[-1] == pytest.approx(fit.evaluate(net, x, y)[0], rel=1e-6)
    net.train()
    fit.fit(net, (x, y), (x, y), epochs=1, progress=False)
    assert all(m.training for m in net.modules())


# ----------------------------------------------------------------------------------------------
# early stopping


def test_early_stopping_bookkeeping_on_a_scripted_run():
    """Validation losses 1.0, 0.5, 0.7, 0.5, 0.9, 0.8 with patience 3: best epoch 2 (a tie is no
    improvement), stop after epoch 5, weights of epoch 2 restored."""
    model = nn.Linear(1, 1)
    cb = fit.EarlyStopping(patience=3)
    history = fit.History()
    cb.on_train_begin(model, history)
    stops = []
    for epoch, loss in enumerate([1.0, 0.5, 0.7, 0.5, 0.9, 0.8], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        history.val_loss.append(loss)
        history.val_acc.append(0.0)
        stops.append(cb.on_epoch_end(epoch, model, history))
        if stops[-1]:
            break
    assert stops == [False, False, False, False, True]
    cb.on_train_end(model, history)
    assert history.best_epoch == 2 and float(model.weight.detach()) == 2.0


def test_early_stopping_monitors_accuracy_and_min_delta():
    model = nn.Linear(1, 1)
    cb = fit.EarlyStopping(patience=2, monitor="val_acc", min_delta=0.05)
    h = fit.History()
    cb.on_train_begin(model, h)
    out = []
    for epoch, acc in enumerate([0.5, 0.6, 0.62, 0.64], start=1):  # +0.02 steps are below min_delta
        h.val_acc.append(acc)
        h.val_loss.append(0.0)
        out.append(cb.on_epoch_end(epoch, model, h))
    assert out == [False, False, False, True] and cb.best_epoch == 2


def test_fit_with_early_stopping_restores_the_best_epoch():
    x, y = _toy_data(n=120)
    # a tiny validation set and a large learning rate: the validation loss goes up and down
    net = _tiny_net()
    record = _Record()
    h = fit.fit(net, (x[:100], y[:100]), (x[100:], y[100:]), epochs=25, lr=0.2, batch_size=10, progress=False,
                callbacks=[record, fit.EarlyStopping(patience=2)])
    best = int(np.argmin(h.val_loss)) + 1
    assert h.best_epoch == best
    assert h.stopped_early == (h.epochs < 25) and (not h.stopped_early or h.epochs == best + 2)
    assert best < h.epochs, "the test needs a run whose last epoch is not its best"
    for k, v in net.state_dict().items():
        assert torch.equal(v, record.states[best - 1][k]), k
    assert fit.evaluate(net, x[100:], y[100:])[0] == pytest.approx(h.val_loss[best - 1], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# the model as it was after an error; bad input


class _Boom(fit.Callback):
    def on_epoch_end(self, epoch, model, history):
        if epoch == 2:
            raise RuntimeError("boom")
        return False


def test_model_restored_on_error():
    x, y = _toy_data(n=64)
    net = _tiny_net(dropout=0.2).eval()
    net[0].weight.requires_grad_(False)
    before = model_state(net)
    with pytest.raises(RuntimeError, match="boom"):
        fit.fit(net, (x, y), (x, y), epochs=3, lr=0.1, progress=False, callbacks=[_Boom()])
    assert before.differences(model_state(net)) == []

    def bad_augment(xb, gen):
        raise ValueError("bad augment")

    with pytest.raises(ValueError, match="bad augment"):
        fit.fit(net, (x, y), (x, y), epochs=1, progress=False, augment=bad_augment)
    assert before.differences(model_state(net)) == []


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(model="net"), TypeError, "nn.Module"),
    (dict(train=(1, 2)), TypeError, "torch tensors"),
    (dict(train=[torch.zeros(4, 1, 12, 12)]), TypeError, "pair"),
    (dict(train=(torch.zeros(4, 1, 12, 12), torch.zeros(4))), ValueError, "int64"),
    (dict(train=(torch.zeros(4, 1, 12, 12), torch.zeros(3, dtype=torch.long))), ValueError, r"\(4,\)"),
    (dict(val=(torch.zeros(0, 1, 12, 12), torch.zeros(0, dtype=torch.long))), ValueError, "empty"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(batch_size=2.5), ValueError, "batch_size"),
    (dict(lr=-1.0), ValueError, "lr must be a positive number, got -1.0"),
    (dict(callbacks=[lambda *a: None]), TypeError, "Callback"),
    (dict(augment="flip"), TypeError, "augment"),
])
def test_bad_input_names_the_problem(kwargs, error, match):
    x, y = _toy_data(n=8)
    net = _tiny_net()
    before = model_state(net)
    args = dict(model=net, train=(x, y), val=(x, y))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fit.fit(args.pop("model"), args.pop("train"), args.pop("val"), progress=False, **args)
    assert before.differences(model_state(net)) == []


def test_nothing_to_train_and_other_bad_arguments():
    x, y = _toy_data(n=8)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        fit.fit(_tiny_net().requires_grad_(False), (x, y), (x, y), progress=False)
    with pytest.raises(ValueError, match="monitor"):
        fit.EarlyStopping(monitor="loss")
    with pytest.raises(ValueError, match="patience"):
        fit.EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        fit.EarlyStopping(min_delta=-1)
    with pytest.raises(ValueError, match="dropout"):
        fit.small_cnn(dropout=1.0)
    with pytest.raises(ValueError, match="source"):
        fit.split_fashion_mnist(source="web")
    with pytest.raises(ValueError, match="no training image"):
        fit.split_fashion_mnist(n_val=5000, n_test=5000)
    with pytest.raises(ValueError, match="more than the 8 images"):
        fit.stratified_subset(x, y, 9)
    with pytest.raises(TypeError, match="History"):
        fit.plot_history({"loss": [1]})
    with pytest.raises(TypeError, match="timm network"):
        fit.FrozenFeatures(_tiny_net())


# ----------------------------------------------------------------------------------------------
# data


def test_split_has_no_leak_and_is_seeded(fashion_test):
    s = fit.split_fashion_mnist(n_val=500, n_test=1000, seed=1)
    assert s.sizes() == {"train": 8500, "val": 500, "test": 1000}
    x_all, _ = fashion_test
    # every shipped image lands in exactly one part: the parts' images, sorted, are the whole set
    parts = torch.cat([s.train[0], s.val[0], s.test[0]]).flatten(1)
    whole = x_all.flatten(1)
    key = lambda t: sorted(map(bytes, (t * 255).round().to(torch.uint8).numpy()))  # noqa: E731
    assert key(parts) == key(whole)
    again = fit.split_fashion_mnist(n_val=500, n_test=1000, seed=1)
    other = fit.split_fashion_mnist(n_val=500, n_test=1000, seed=2)
    assert torch.equal(again.test[0], s.test[0]) and not torch.equal(other.test[0], s.test[0])


def test_stratified_subset_balances_classes():
    y = torch.cat([torch.full((50,), c) for c in range(10)])[torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    x = torch.arange(500).float()[:, None]
    xs, ys = fit.stratified_subset(x, y, 100, seed=3)
    assert torch.bincount(ys, minlength=10).tolist() == [10] * 10
    assert torch.equal(y[xs[:, 0].long()], ys), "images and labels stay paired"
    assert len(set(xs[:, 0].tolist())) == 100
    assert not torch.equal(fit.stratified_subset(x, y, 100, seed=4)[0], xs)


def test_flip_shift_is_seeded_and_moves_pixels():
    x = torch.rand(8, 1, 10, 10)
    a = fit.FlipShift(2)(x, torch.Generator().manual_seed(0))
    b = fit.FlipShift(2)(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    flipped = fit.FlipShift(0)(x, torch.Generator().manual_seed(0))
    for img, out in zip(x, flipped):
        assert torch.equal(out, img) or torch.equal(out, img.flip(-1))
    assert not torch.equal(flipped, x)


# ----------------------------------------------------------------------------------------------
# transfer learning


def test_frozen_backbone_does_not_move(effnet):
    model = fit.transfer_model(copy.deepcopy(effnet), num_classes=3, hidden=8, size=32)
    backbone = model.features.backbone
    before = [t.clone() for t in list(backbone.parameters()) + list(backbone.buffers())]
    head_before = [p.clone() for p in model.head.parameters()]
    assert not any(p.requires_grad for p in backbone.parameters())
    model.train()
    assert not any(m.training for m in backbone.modules()), "the backbone stays in eval mode"
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 1, 28, 28, generator=g), torch.randint(0, 3, (12,), generator=g)
    fit.fit(model, (x, y), (x[:4], y[:4]), epochs=1, batch_size=6, lr=1e-2, progress=False)
    after = list(backbone.parameters()) + list(backbone.buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "backbone weights or BatchNorm statistics moved"
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters())), "the head trained"


def test_a_frozen_backbone_in_train_mode_would_move(effnet):
    """The control for the test above: requires_grad=False alone leaves BatchNorm statistics updating."""
    net = copy.deepcopy(effnet).train()
    before = [b.clone() for b in net.buffers()]
    with torch.no_grad():
        net(torch.rand(2, 3, 32, 32))
    assert any(not torch.equal(a, b) for a, b in zip(before, net.buffers()))


def test_features_match_the_backbone_and_carry_input_gradients(effnet):
    feats = fit.FrozenFeatures(copy.deepcopy(effnet), size=32)
    x = torch.rand(5, 1, 28, 28)
    got = fit.extract_features(feats, x, batch_size=2, progress=False)
    rgb = F.interpolate(x.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear", align_corners=False)
    net = effnet.net
    with torch.no_grad():
        expected = net.global_pool(net.bn2(net.conv_head(net.blocks(net.bn1(net.conv_stem((rgb - 0.5) / 0.5))))))
    torch.testing.assert_close(got, expected.flatten(1), rtol=1e-4, atol=1e-5)
    xg = x[:1].clone().requires_grad_(True)
    feats(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_confusion_matrix_matches_sklearn():
    from sklearn.metrics import confusion_matrix as sk_confusion

    x, y = _toy_data(n=50)
    net = _tiny_net().train()
    cm = fit.confusion_matrix(net, x, y, 2)
    with torch.no_grad():
        pred = net.eval()(x).argmax(1)
    assert np.array_equal(cm, sk_confusion(y.numpy(), pred.numpy(), labels=[0, 1]))
    net.train()
    fit.confusion_matrix(net, x, y, 2)
    assert net.training, "mode put back"


def test_plot_history_draws_the_numbers():
    h = fit.History(train_loss=[1.0, 0.5], train_acc=[0.5, 0.7], val_loss=[0.9, 0.8], val_acc=[0.6, 0.65], best_epoch=2)
    fig = fit.plot_history(h, title="t")
    ax_loss, ax_acc = fig.axes[:2]
    assert [list(line.get_ydata()) for line in ax_loss.lines[:2]] == [h.train_loss, h.val_loss]
    assert [list(line.get_ydata()) for line in ax_acc.lines[:2]] == [h.train_acc, h.val_acc]
    assert ax_loss.get_xlabel() == "epoch" and "loss" in ax_loss.get_title()
    ax = fit.plot_confusion(np.eye(10, dtype=int) * 3)
    assert "100.0%" in ax.get_title()


def _write_idx(path, array):
    import gzip

    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_full_source_takes_train_and_val_from_the_training_split(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 28, 28))
    images[:, 0, 0] = np.arange(300) % 256  # every fake training image distinct
    images[:, 0, 1] = np.arange(300) // 256
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 300))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    s = fit.split_fashion_mnist(n_val=50, n_test=100, seed=0, source="full")
    assert s.sizes() == {"train": 250, "val": 50, "test": 100} and "training split" in s.source
    fake = torch.from_numpy(images.astype(np.float32) / 255)[:, None]
    key = lambda t: sorted(map(bytes, (t * 255).round().to(torch.uint8).numpy()))  # noqa: E731
    assert key(torch.cat([s.train[0], s.val[0]])) == key(fake), "train + val are the training split, no image twice"
    assert fit.split_fashion_mnist(n_val=50, n_test=100, source="auto").sizes()["train"] == 250
    with pytest.raises(ValueError, match="too large"):
        fit.split_fashion_mnist(n_val=300, source="full")
