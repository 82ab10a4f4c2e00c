"""Deployment: the network exported to ONNX, run by onnxruntime, post-processed in Python.

The pure-PyTorch deformable attention (written with ``grid_sample`` while ``torch.export`` traces,
:func:`.modeling.ms_deform_attn.ms_deform_attn_grid_sample`) lets the whole
network be exported. The exported graph (:class:`ExportedNetwork`) goes from the normalised, padded image
batch of one image to the per-query predictions the post-processors take
(:meth:`PanopticSegFormer.per_query_predictions`): class distribution, class probability, label, is-thing
and the mask logits at 1/8 of the padded input (plus the location decoder's "thing_boxes" when the config
takes thing classes from it). Height and width are symbolic dimensions of the graph; ONNX opset
:data:`OPSET` (>= 16 for ``GridSample``).

:class:`OnnxPredictor` is ``DefaultPredictor`` with onnxruntime as the network: the same pre-processing
and input checks as :class:`~.predictor.PanopticSegFormerPredictor`, then the meta-architecture's own
post-processing (:meth:`PanopticSegFormer.image_outputs`, the registered post-processor) applied to the
runtime's outputs, so it returns the same ``panoptic_seg`` / ``instances`` / ``sem_seg``.
"""
import os
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.structures import ImageList
from torch import nn

from .modeling.ms_deform_attn import MSDeformAttn
from .predictor import PanopticSegFormerPredictor

__all__ = ["ExportedNetwork", "OnnxPredictor", "check_exportable", "export_onnx", "INPUT_NAMES", "OPSET",
           "PER_QUERY_OUTPUTS"]

OPSET = 18
INPUT_NAMES = ("image", "image_size")
# per_query_predictions' tuple, in order; "thing_boxes" follows when the config takes thing classes from
# the location decoder (TEST.THING_CLASS_SOURCE "location_decoder").
PER_QUERY_OUTPUTS = ("class_distribution", "class_probs", "labels", "is_thing", "mask_logits")
_MSDA_KEY = "MODEL.PANOPTIC_SEGFORMER.MSDA_IMPL"


class ExportedNetwork(nn.Module):
    """The exported part of a :class:`PanopticSegFormer` (in eval mode): network + per-query predictions.

    Inputs: ``image`` (1, 3, H_pad, W_pad) float32, normalised and padded as
    :meth:`PanopticSegFormer.preprocess_image` makes it; ``image_size`` (1, 2) int64, the (h, w) of the
    image inside the padding. Outputs: :data:`PER_QUERY_OUTPUTS` of the image -- class_distribution
    (Q, K), class_probs (Q,), labels (Q,) int64, is_thing (Q,) bool, mask_logits (Q, H_pad/8, W_pad/8) --
    and thing_boxes (Q_th, 4) when :meth:`PanopticSegFormer.forward_outputs` gives them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, image_size: torch.Tensor):
        model = self.model
        outputs = model.forward_outputs(ImageList(image, image_size), num_mask_layers=model.test_mask_decoder_layers)
        result = model.per_query_predictions(outputs["mask"][-1], 0)
        if "thing_boxes" in outputs:
            result = result + (outputs["thing_boxes"][0],)
        return result


def check_exportable(model: nn.Module) -> None:
    """Raise ValueError naming the config key if ``model``'s deformable attention is forced to the Triton
    kernel (a CUDA op that cannot be exported; the export runs the pure-PyTorch path, on the CPU)."""
    for name, module in model.named_modules():
        if isinstance(module, MSDeformAttn) and module.impl == "triton":
            raise ValueError(
                f"{_MSDA_KEY} is 'triton' (module {name}): the Triton kernel cannot be exported to ONNX; "
                f"set {_MSDA_KEY} 'pytorch' or 'auto' (the export traces the pure-PyTorch path on the CPU)")


def export_onnx(model: nn.Module, path: str, image_size: Tuple[int, int] = (512, 512)) -> List[str]:
    """Export ``model`` (a :class:`PanopticSegFormer` on the CPU) to the ONNX file ``path``, with symbolic
    height and width, tracing it on a (1, 3, H, W) example image of ``image_size``. Returns the output names.

    Raises ValueError (naming the key) for a config whose deformable attention is the Triton kernel.
    """
    check_exportable(model)
    if model.device.type != "cpu":
        raise ValueError(f"export the model on the CPU (MODEL.DEVICE 'cpu'), got {model.device}")
    h, w = image_size
    network = ExportedNetwork(model).eval()
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[h, w]], dtype=torch.long)
    dynamic = {"image": {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}, "image_size": None}
    with torch.no_grad():
        names = PER_QUERY_OUTPUTS + ("thing_boxes",)[:len(network(image, sizes)) - len(PER_QUERY_OUTPUTS)]
        program = torch.onnx.export(network, (image, sizes), dynamo=True, opset_version=OPSET,
                                    input_names=list(INPUT_NAMES), output_names=list(names),
                                    dynamic_shapes=dynamic, verbose=False)
    inputs = program.model.graph.inputs
    dims = [d for d in inputs[0].shape.dims[2:]]
    if any(isinstance(d, int) for d in dims):
        raise RuntimeError(f"the export fixed the image size to {dims}: some operation of the network "
                           "specialises on the input's height or width")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path)
    return list(names)


class OnnxPredictor(PanopticSegFormerPredictor):
    """``DefaultPredictor``'s interface on an exported ONNX model, run by onnxruntime on the CPU.

    ``OnnxPredictor(cfg, onnx_path)(bgr_image)`` -> {"panoptic_seg", "instances", "sem_seg"} as
    :class:`PanopticSegFormerPredictor` returns them: same resize (``INPUT.MIN_SIZE_TEST`` /
    ``MAX_SIZE_TEST``), ``INPUT.FORMAT`` conversion and input checks (grayscale / BGRA converted, other
    layouts a ValueError; the model's ``check_input_image``), same post-processing
    (:meth:`PanopticSegFormer.image_outputs`). ``cfg`` must be the config the model was exported from
    (MODEL.WEIGHTS is not read: the weights are in the ONNX file). The meta-architecture is built (random
    initialisation, never run) for its pre- and post-processing.

    Raises:
        FileNotFoundError: ``onnx_path`` does not exist.
        ValueError: ``onnx_path`` is not an ONNX model, or not one exported by :func:`export_onnx` for
            ``cfg`` (inputs, outputs or number of classes differ).
    """

    def __init__(self, cfg, onnx_path: str, providers=("CPUExecutionProvider",)):
        import onnxruntime

        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(f"ONNX model {onnx_path!r} does not exist "
                                    "(export one with `python -m projects.deploy.export`)")
        try:
            session = onnxruntime.InferenceSession(onnx_path, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own InvalidProtobuf / Fail / InvalidGraph types
            raise ValueError(f"{onnx_path!r} is not a loadable ONNX model: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        cpu = cfg.clone()
        cpu.defrost()
        cpu.MODEL.DEVICE = "cpu"  # onnxruntime's outputs are host arrays; post-processing runs on the CPU
        cpu.MODEL.WEIGHTS = ""
        cpu.freeze()
        # DefaultPredictor's setup (resize, INPUT.FORMAT) on a weight-less model; the network is the session.
        super(PanopticSegFormerPredictor, self).__init__(cpu)
        self.cfg = cfg.clone()
        self.onnx_path = onnx_path
        self.model = _OnnxModel(self.model, session, onnx_path)


class _OnnxModel:
    """Callable like the meta-architecture on Detectron2's list of input dicts, with onnxruntime running
    the network (:class:`ExportedNetwork`) one image at a time."""

    def __init__(self, model: nn.Module, session, onnx_path: str):
        self.model = model.eval()
        self.session = session
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != list(INPUT_NAMES) or outputs not in (list(PER_QUERY_OUTPUTS), list(PER_QUERY_OUTPUTS) + ["thing_boxes"]):
            raise ValueError(f"{onnx_path!r} has inputs {inputs} and outputs {outputs}; a Panoptic SegFormer "
                             f"export has inputs {list(INPUT_NAMES)} and outputs {list(PER_QUERY_OUTPUTS)} "
                             "[+ thing_boxes] (export it with `python -m projects.deploy.export`)")
        classes = session.get_outputs()[0].shape[-1]
        if classes != model.num_classes:
            raise ValueError(f"{onnx_path!r} predicts {classes} classes but the config has {model.num_classes} "
                             "(MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES + NUM_STUFF_CLASSES): use the config "
                             "the model was exported from")
        self.output_names = outputs

    def run(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """The runtime's outputs for a padded batch of one image, as CPU tensors by output name."""
        feed = {"image": images.tensor.float().numpy(),
                "image_size": np.asarray(images.image_sizes, dtype=np.int64).reshape(1, 2)}
        return {name: torch.from_numpy(value) for name, value in
                zip(self.output_names, self.session.run(self.output_names, feed))}

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        results = []
        with torch.no_grad():
            for x in batched_inputs:
                images = self.model.preprocess_image([x])
                out = self.run(images)
                per_query = tuple(out[name] for name in PER_QUERY_OUTPUTS)
                results.append(self.model.image_outputs(per_query, out.get("thing_boxes"), x,
                                                        images.image_sizes[0]))
        return results
