"""The calibration cache holds plain data: it reloads with ``weights_only=True`` into equal samples,
and a cache it cannot read (an older format, pickled classes) is rebuilt, not a crash."""

import pickle

import torch

from mixattn.compress import calibration, pipeline
from mixattn.data import tasks


def _samples():
    src = tasks.Sample([1, 2, 3], ("42",), [1, 2], [3, 4], {"depth": 0.5})
    return [calibration.CalibSample(torch.arange(5), torch.tensor([0, 0, 1, 1, 0], dtype=torch.bool), 8, "passkey",
                                    True, src),
            calibration.CalibSample(torch.arange(3), torch.zeros(3, dtype=torch.bool), 8)]  # fmt: skip


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.answer_mask, y.answer_mask)
        assert (x.length, x.task, x.own, x.source) == (y.length, y.task, y.own, y.source)


def test_cache_round_trips_as_plain_data(tmp_path):
    path = tmp_path / "calibration.pt"
    built = pipeline._cached(path, resume=True, build=_samples)  # nothing cached yet: built and saved
    _same(built, _samples())
    _same(calibration.from_plain(torch.load(path, weights_only=True)), _samples())  # no classes inside
    _same(pipeline._cached(path, resume=True, build=lambda: 1 / 0), _samples())  # read back, not rebuilt


def test_an_unreadable_older_cache_is_rebuilt(tmp_path):
    path = tmp_path / "calibration.pt"
    torch.save(_samples(), path, pickle_protocol=pickle.HIGHEST_PROTOCOL)  # the old format: pickled classes
    calls = []
    rebuilt = pipeline._cached(path, resume=True, build=lambda: calls.append(1) or _samples())
    assert calls == [1]
    _same(rebuilt, _samples())
    _same(calibration.from_plain(torch.load(path, weights_only=True)), _samples())  # rewritten as plain data
