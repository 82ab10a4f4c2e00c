"""projects/tools/plot_metrics.py on metrics.json files written by Detectron2's own JSONWriter."""
import os

import numpy as np
import pytest
from detectron2.utils.events import EventStorage, JSONWriter
from PIL import Image

from projects.tools import plot_metrics


def _write_run(out_dir, scale=1.0, iters=20, eval_every=10):
    """A metrics.json as a Detectron2 training run writes it: losses every iteration, PQ at evals."""
    os.makedirs(out_dir, exist_ok=True)
    writer = JSONWriter(os.path.join(out_dir, "metrics.json"))
    with EventStorage(0) as storage:
        for it in range(iters):
            storage.iter = it
            loss = scale * 3.0 / (1 + it)
            storage.put_scalars(total_loss=loss, loss_things_mask_1=loss / 3, lr=1e-4)
            if (it + 1) % eval_every == 0:
                storage.put_scalars(**{"panoptic_seg/PQ": 10.0 * scale + it, "panoptic_seg/PQ_st": 20.0 + it},
                                    smoothing_hint=False)
            writer.write()
    writer.close()
    return os.path.join(out_dir, "metrics.json")


def _check_png(path, size):
    assert os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        pixels = np.asarray(im.convert("L"))
    assert pixels.min() < 128 < pixels.max()  # something was drawn on the white canvas


def test_two_runs_default_keys(tmp_path):
    a = _write_run(str(tmp_path / "run_a"))
    b = _write_run(str(tmp_path / "run_b"), scale=2.0)
    records = plot_metrics.load_metrics(a)
    its, pq = plot_metrics.series(records, "panoptic_seg/PQ")
    assert its == [9, 19] and pq == [19.0, 29.0]
    out = str(tmp_path / "plots" / "curves.png")
    assert plot_metrics.main([a, b, "-o", out]) == out
    # total_loss, PQ and PQ_st exist: 3 subplots in 2 columns of 5.5 x 3.6 inches at 100 dpi.
    _check_png(out, (1100, 720))


def test_chosen_keys(tmp_path):
    a = _write_run(str(tmp_path / "run"))
    out = str(tmp_path / "one.png")
    plot_metrics.main([a, "-o", out, "--keys", "loss_things_mask_1", "--columns", "1"])
    _check_png(out, (550, 360))


def test_missing_key_is_an_error_listing_the_keys(tmp_path):
    a = _write_run(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"'panoptic_seg/SQ'.*available keys: .*'panoptic_seg/PQ'.*'total_loss'"):
        plot_metrics.main([a, "-o", str(tmp_path / "x.png"), "--keys", "total_loss", "panoptic_seg/SQ"])
    assert not (tmp_path / "x.png").exists()


def test_bad_files_are_errors_naming_them(tmp_path):
    missing = str(tmp_path / "nope" / "metrics.json")
    with pytest.raises(FileNotFoundError, match="nope/metrics.json"):
        plot_metrics.main([missing])
    bad = tmp_path / "metrics.json"
    bad.write_text('{"iteration": 0, "total_loss": 1.0}\n{"iteration": 1, "total_loss": \n')
    with pytest.raises(ValueError, match=r"metrics.json:2"):
        plot_metrics.load_metrics(str(bad))
    with pytest.raises(ValueError, match="2 labels for 1 metrics files"):
        plot_metrics.plot_metrics([_write_run(str(tmp_path / "r"))], str(tmp_path / "y.png"), labels=["a", "b"])
