"""``fastfair eval`` checks the synthetic set before any training: non-finite
images and malformed fields end in one line, exit 2 (issue 13.7, 13.8); an
accuracy near chance comes with a note that its DEO means nothing (13.7)."""
from __future__ import annotations

import pytest
import torch

from fastfair import cli, data
from fastfair.evaluate import chance_note, evaluate_synset


def _synset(tmp_path, **over):
    syn = {"images": torch.zeros(10, 3, 32, 32), "labels": torch.arange(10),
           "config": {"dataset": "cdigits-fg", "method": "dm", "objective": "fairdd"}}
    syn.update(over)
    path = tmp_path / "synset.pt"
    torch.save(syn, path)
    return str(path)


NAN = torch.zeros(10, 3, 32, 32)
NAN[3, 1, 2, 2] = float("nan")
INF = torch.zeros(10, 3, 32, 32)
INF[0, 0, 0, 0] = float("inf")


@pytest.mark.parametrize("over,expect", [
    ({"images": NAN}, "non-finite"),
    ({"images": INF}, "non-finite"),
    ({"config": "cdigits-fg"}, "'config' must be a dict"),
    ({"config": {"dataset": 5}}, "config 'dataset' must be a string"),
    ({"config": {"dataset": "cdigits-fg", "extra": []}}, "'extra' must be a dict"),
    ({"config": {"dataset": "cdigits-fg", "bias_ratio": "high"}}, "'bias_ratio' must be a number"),
    ({"images": torch.zeros(10, 3, 32)}, "'images' must be a float tensor"),
    ({"labels": torch.arange(9)}, "one label per image"),
    ({"labels": torch.zeros(10)}, "'labels' must be an integer tensor"),
])
def test_bad_synsets_are_one_line_errors(tmp_path, capsys, over, expect):
    path = _synset(tmp_path, **over)
    code = cli.main(["eval", path, "--epochs", "1", "--runs", "1", "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and expect in err, (code, err)
    assert "Acc" not in out  # nothing was trained or reported


def test_evaluate_synset_refuses_non_finite_images():
    ds = data.load("synthetic", num_classes=2, num_groups=2, image_size=8, n_per_class=4)
    imgs = torch.zeros(2, ds.channels, 8, 8)
    imgs[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_synset(imgs, torch.arange(2), ds, epochs=1, runs=1, progress=False, device="cpu")


def test_chance_note():
    assert chance_note(10.0, 10) is not None and "chance" in chance_note(9.8, 10)
    assert chance_note(60.0, 10) is None
    assert chance_note(52.0, 2) is not None and chance_note(80.0, 2) is None


def test_eval_of_a_constant_set_carries_the_chance_note(tmp_path, capsys):
    # All-zero images: every network predicts one class, DEO 0 -- the note must qualify it.
    path = _synset(tmp_path)
    code = cli.main(["eval", path, "--epochs", "1", "--runs", "1", "--width", "8", "--no-progress", "--device",
                     "cpu", "--no-dsa"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "near chance level" in out and "DEO" in out
