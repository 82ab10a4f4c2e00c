"""ONNX export: the exported network in onnxruntime gives PyTorch's per-query outputs, and
OnnxPredictor gives PanopticSegFormerPredictor's Detectron2 outputs.

One export per module (about a minute on 2 cores: torch.export, ONNX translation, onnxscript's optimiser):
the `shapes` config with the COCO sample's 80 thing / 53 stuff classes, its class biases and attention
projections perturbed (:func:`test_golden_outputs._perturbed_model`, mildly, with a low t_cnf, so that
segments compete in the merge and the comparison is not between two empty outputs). The graph is traced at one image size and run
at others: two synthetic `shapes` images of different sizes and the 2 real COCO sample images (R50 COCO
config export: docs/BENCHMARKS.md, too slow for the suite). The demo draws with the ONNX backend; errors name
the key or the file.
"""
import os

import cv2
import numpy as np
import pytest
import torch

from test_golden_outputs import _perturbed_model

TRACE_SIZE = (96, 128)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from panoptic_segformer.deploy import export_onnx

    # Milder than the golden test's perturbation (mask logits within about +-11, not +-100s, where float32
    # sums in another order differ by more than 1e-4); low t_cnf so that segments still compete.
    cfg, model = _perturbed_model("paper", ["MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.02",
                                            "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.02"],
                                  attention_noise=0.1, mask_bias_shift=0.0)
    path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    names = export_onnx(model, path, TRACE_SIZE)
    return cfg, model, path, names


def _images(coco_sample_root):
    from panoptic_segformer.data.datasets.shapes import render_shapes_sample

    images = {}
    for size in ((150, 220), (256, 176)):
        rgb, _, _ = render_shapes_sample(0, "val", 1, size)
        images[f"shapes {size}"] = np.ascontiguousarray(rgb[:, :, ::-1])
    folder = os.path.join(coco_sample_root, "images")
    for name in sorted(os.listdir(folder)):
        images[name] = cv2.imread(os.path.join(folder, name))
    return images


def _without_scores(segments_info):
    return [{k: v for k, v in s.items() if k != "score"} for s in segments_info]


def test_onnxruntime_per_query_outputs_and_predictions_equal_pytorch(exported, coco_sample_root):
    import onnxruntime

    from panoptic_segformer import OnnxPredictor, PanopticSegFormerPredictor
    from panoptic_segformer.deploy import PER_QUERY_OUTPUTS, ExportedNetwork
    from projects.demo.demo import predictor_inputs

    cfg, model, path, names = exported
    assert names == list(PER_QUERY_OUTPUTS)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    height, width = session.get_inputs()[0].shape[2:]
    assert isinstance(height, str) and isinstance(width, str), "height and width must be symbolic"

    reference = PanopticSegFormerPredictor(cfg)
    reference.model = model  # the perturbed weights that were exported
    onnx = OnnxPredictor(cfg, path)
    network = ExportedNetwork(model)
    sizes_seen, segments_seen, flips = set(), 0, 0
    for name, bgr in _images(coco_sample_root).items():
        # Per-query outputs on the exact input the predictors build (resize, format, normalise, pad).
        with torch.no_grad():
            images = model.preprocess_image([predictor_inputs(reference, bgr)])
            want = network(images.tensor, torch.tensor([images.image_sizes[0]]))
        got = onnx.model.run(images)
        sizes_seen.add(tuple(images.tensor.shape[-2:]))
        for key, w in zip(PER_QUERY_OUTPUTS, want):
            g = got[key]
            assert g.shape == w.shape and g.dtype == w.dtype, (name, key, g.shape, w.shape)
            if w.is_floating_point():  # two float32 runtimes (ORT's kernels vs ATen): ~1e-5 on logits <= ~11
                assert torch.allclose(g, w, rtol=0, atol=1e-4), (name, key, float((g - w).abs().max()))
            else:
                # labels / is_thing: an argmax over the class distribution, so equal except at queries whose
                # two largest class probabilities lie within twice the float tolerance above (a near-tie)
                top2 = want[0].topk(2, dim=-1).values
                decided = (top2[..., 0] - top2[..., 1]) > 2e-4
                assert torch.equal(g[decided], w[decided]), (name, key)
        # Detectron2 outputs through the registered post-processor: the same panoptic segmentation.
        a, b = reference(bgr), onnx(bgr)
        # The same map, up to pixels where a mask probability lies within float32 noise of the 0.5 threshold
        # (measured: 1 pixel of 307,200 on 000000142238.jpg, none on the other three images).
        flipped = int((a["panoptic_seg"][0] != b["panoptic_seg"][0]).sum())
        assert flipped <= 3, (name, flipped)
        flips += flipped
        # Same segments (ids, classes, areas ...); their float scores within 1e-4 (scores in [0, 1] from
        # probabilities ~1e-5 apart, as are instance scores and sem_seg below).
        assert _without_scores(a["panoptic_seg"][1]) == _without_scores(b["panoptic_seg"][1]), name
        assert np.allclose([s["score"] for s in a["panoptic_seg"][1]], [s["score"] for s in b["panoptic_seg"][1]],
                           rtol=0, atol=1e-4), name
        segments_seen += len(a["panoptic_seg"][1])
        assert a["panoptic_seg"][0].shape == bgr.shape[:2]
        # Instances are ranked by score: equal classes, except that two instances whose scores are within
        # twice the score tolerance (2e-4) may come out in either order.
        ca, cb, sa = a["instances"].pred_classes, b["instances"].pred_classes, a["instances"].scores
        for i in (ca != cb).nonzero().flatten().tolist():
            assert any(int(ca[j]) == int(cb[i]) and abs(float(sa[j] - sa[i])) <= 2e-4 for j in range(len(ca))), name
        assert torch.allclose(a["instances"].scores, b["instances"].scores, atol=1e-4), name
        assert torch.allclose(a["sem_seg"], b["sem_seg"], atol=1e-4), name
    assert len(sizes_seen) == 3 and TRACE_SIZE not in sizes_seen  # 3 padded sizes (the COCO pair share one), none traced
    assert segments_seen >= 4  # the comparison is between real merges, not empty outputs
    assert flips <= 3, flips


def test_grayscale_and_bad_arrays_are_handled_as_by_the_pytorch_predictor(exported):
    from panoptic_segformer import OnnxPredictor

    cfg, _, path, _ = exported
    predictor = OnnxPredictor(cfg, path)
    gray = np.full((90, 120), 128, dtype=np.uint8)
    assert predictor(gray)["panoptic_seg"][0].shape == (90, 120)
    with pytest.raises(ValueError, match=r"shape \(3, 90, 120\).*channels-first"):
        predictor(np.zeros((3, 90, 120), dtype=np.uint8))


def test_export_refuses_the_triton_kernel_naming_the_key(tmp_path):
    from projects.deploy.export import main

    shapes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "shapes", "panoptic_segformer_shapes.yaml")
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"MODEL\.PANOPTIC_SEGFORMER\.MSDA_IMPL is 'triton'"):
        main(["--config-file", shapes, "--output", str(out), "MODEL.PANOPTIC_SEGFORMER.MSDA_IMPL", "triton"])
    assert not out.exists()


def test_onnx_predictor_errors_name_the_file(exported, tmp_path):
    from conftest import small_cfg

    from panoptic_segformer import OnnxPredictor

    cfg, _, path, _ = exported
    missing = str(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxPredictor(cfg, missing)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(ValueError, match=r"notes\.onnx.*not a loadable ONNX model"):
        OnnxPredictor(cfg, str(text))
    # A config with other classes than the exported model's (shapes: 4 + 3 classes, the export: 133).
    with pytest.raises(ValueError, match=r"predicts 133 classes but the config has 7"):
        OnnxPredictor(small_cfg(), path)


def test_demo_draws_with_the_onnx_backend(exported, coco_sample_root, tmp_path):
    from test_golden_outputs import MODELS, SHAPES_YAML

    from projects.demo import demo

    _, _, path, _ = exported
    image = os.path.join(coco_sample_root, "images", sorted(os.listdir(os.path.join(coco_sample_root, "images")))[0])
    out = tmp_path / "drawn.png"
    argv = ["--config-file", SHAPES_YAML, "--input", image, "--output", str(out), "--backend", "onnx",
            "--onnx-model", path, "--opts"] + MODELS["paper"]
    assert demo.main(argv) == 0
    assert cv2.imread(str(out)).shape[:2] == cv2.imread(image).shape[:2]
    with pytest.raises(SystemExit, match="--backend onnx needs --onnx-model"):
        demo.main([a for a in argv if a not in ("--onnx-model", path)])
