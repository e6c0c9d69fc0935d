#!/usr/bin/python3
"""Converts a PyTorch MobileNet state dict (.pth) - torchvision's
mobilenet_v2 weights, or a MobileNetV1 with hfq's names - into an hfq
checkpoint (.safetensors), for users who have PyTorch.

    /usr/bin/python3 scripts/convert_torchvision.py mobilenet_v2-b0353104.pth mobilenet_v2.safetensors
    /usr/bin/python3 scripts/convert_torchvision.py my_v1.pth v1.safetensors --arch v1 --width 0.5 --classes 10

What it does
  * Loads the .pth on the CPU (a plain state dict, a dict holding one under
    "state_dict" or "model", or a whole pickled nn.Module).
  * Builds the same network in PyTorch (torchvision.models.mobilenet_v2, or
    the MobileNetV1 below) from --arch/--width/--classes/--input-channels/
    --small-input and checks that every name and shape matches, so a wrong
    option is reported here, not later.
  * Writes every tensor under its PyTorch name, unchanged (float32 weights in
    OIHW layout, int64 num_batches_tracked), with the metadata hfq reads:
      "format": "pt", "hfq.model": the architecture as JSON,
      "hfq.preprocessing": resize/crop sizes and mean/std as JSON.
    The result is also what safetensors.torch.save_file(model.state_dict())
    would write, so PyTorch users can load it back with safetensors.torch.

Nothing here is needed when the `safetensors` package is installed and the
architecture is given on mobilenet_predict's command line: a file written by
safetensors.torch.save_file(model.state_dict()) loads as it is. The writer
below exists because `safetensors` is not a Debian package.

The module is also imported by tests/fixtures/make_model_fixtures.py (the
MobileNetV1 definition and the writer).
"""
import argparse
import json
import os
import struct
import sys

import torch
import torch.nn as nn

# ---------------------------------------------------------------------------
# safetensors writer (8-byte little-endian header length, JSON header, data)
# ---------------------------------------------------------------------------

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.float64: "F64", torch.int64: "I64",
           torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8"}


def save_safetensors(tensors, path, metadata=None):
    """tensors: {name: tensor} (written in this order); metadata: {str: str}.
    Written to a temporary file, then renamed: an interrupted run never leaves
    a half-written file behind."""
    header = {}
    if metadata:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors equivalent here")
        # numpy() gives the machine's byte order; x86 and ARM are little-endian.
        assert sys.byteorder == "little"
        blob = t.numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# The networks, as hfq builds them (layers/mobilenet_v1.h, layers/mobilenet_v2.h)
# ---------------------------------------------------------------------------

# (output channels, stride) of MobileNetV1's 13 depthwise-separable blocks.
V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
             (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def _conv_bn_act(cin, cout, k, stride, groups, act):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True) if act == "relu6" else nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """The shared benchmark's MobileNetV1 (features.{i} = conv-BN-act,
    `classifier` Linear, channels max(int(c * width), 8)), plus hfq's options:
    input channels, the small-input stem (stride 1) and dropout."""

    def __init__(self, num_classes=1000, width=1.0, act="relu6", input_channels=3,
                 small_input=False, dropout=0.0):
        super().__init__()
        ch = lambda c: max(int(c * width), 8)
        layers = [_conv_bn_act(input_channels, ch(32), 3, 1 if small_input else 2, 1, act)]
        cin = ch(32)
        for cout, stride in V1_BLOCKS:
            cout = ch(cout)
            layers.append(_conv_bn_act(cin, cin, 3, stride, cin, act))  # depthwise
            layers.append(_conv_bn_act(cin, cout, 1, 1, 1, act))        # pointwise
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(self.dropout(x))


def build_torch_model(config):
    """The PyTorch network for an hfq model config (the "hfq.model" JSON)."""
    arch, width, classes = config["arch"], config["width"], config["classes"]
    cin, small = config["input_channels"], config["small_input"]
    if arch == "mobilenet_v1":
        return MobileNetV1(classes, width, config["activation"], cin, small, config["dropout"])
    import torchvision
    m = torchvision.models.mobilenet_v2(num_classes=classes, width_mult=width, dropout=config["dropout"])
    if cin != 3:
        old = m.features[0][0]
        m.features[0][0] = nn.Conv2d(cin, old.out_channels, 3, old.stride, 1, bias=False)
        nn.init.kaiming_normal_(m.features[0][0].weight, mode="fan_out")
    if small:  # stem and the first stride-2 stage (features.2) at stride 1
        m.features[0][0].stride = (1, 1)
        m.features[2].conv[1][0].stride = (1, 1)
    return m


def model_config(arch, width, classes, input_channels=3, small_input=False, activation="relu6", dropout=None):
    arch = {"v1": "mobilenet_v1", "v2": "mobilenet_v2"}.get(arch, arch)
    if dropout is None:
        dropout = 0.0 if arch == "mobilenet_v1" else 0.2
    return {"arch": arch, "width": width, "classes": classes, "input_channels": input_channels,
            "small_input": small_input, "activation": activation, "dropout": dropout}


IMAGENET_PREPROCESSING = {"resize_size": 256, "crop_size": 224,
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------

def load_state_dict(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a pickled nn.Module needs the full unpickler
        obj = torch.load(path, map_location="cpu")
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        sys.exit(f"{path}: not a state dict (a mapping of names to tensors)")
    # DataParallel / DistributedDataParallel prefix every name with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_against(state, reference):
    """Every name and shape of `reference` (a state dict) must be in `state`."""
    problems = []
    for name, t in reference.items():
        if name not in state:
            problems.append(f"missing {name} {list(t.shape)}")
        elif state[name].shape != t.shape:
            problems.append(f"{name}: {list(state[name].shape)} in the file, {list(t.shape)} expected")
    problems += [f"unexpected {name}" for name in state if name not in reference]
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="PyTorch .pth file")
    p.add_argument("output", help="hfq checkpoint to write (.safetensors)")
    p.add_argument("--arch", choices=["v1", "v2"], default="v2")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--input-channels", type=int, default=3)
    p.add_argument("--small-input", action="store_true")
    p.add_argument("--activation", choices=["relu6", "relu"], default="relu6", help="V1 only")
    p.add_argument("--dropout", type=float, default=None, help="default: V1 0, V2 0.2")
    p.add_argument("--resize-size", type=int, default=256)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--mean", type=float, nargs="+", default=IMAGENET_PREPROCESSING["mean"])
    p.add_argument("--std", type=float, nargs="+", default=IMAGENET_PREPROCESSING["std"])
    a = p.parse_args()

    config = model_config(a.arch, a.width, a.classes, a.input_channels, a.small_input, a.activation, a.dropout)
    state = load_state_dict(a.input)
    problems = check_against(state, build_torch_model(config).state_dict())
    if problems:
        sys.exit(f"{a.input} does not match {json.dumps(config)}:\n  " + "\n  ".join(problems[:20]))
    # hfq computes in float32; num_batches_tracked stays int64.
    tensors = {k: (v.float() if v.is_floating_point() else v.long()) for k, v in state.items()}
    preprocessing = {"resize_size": a.resize_size, "crop_size": a.crop_size, "mean": a.mean, "std": a.std}
    save_safetensors(tensors, a.output, {"format": "pt", "hfq.model": json.dumps(config),
                                         "hfq.preprocessing": json.dumps(preprocessing)})
    print(f"wrote {a.output}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values")


if __name__ == "__main__":
    main()
