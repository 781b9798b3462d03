"""Export a training checkpoint to ONNX or TorchScript, with the metadata predict needs and a parity check.

``python scripts/export.py --checkpoint CKPT --format onnx|torchscript --output FILE`` writes the model with
dynamic batch / height / width and its :class:`~fcn.checkpoint.ModelMeta` embedded (ONNX ``metadata_props``,
TorchScript ``fcn_meta.json``), atomically; the file alone drives predict. It is then run as predict runs it
and compared with PyTorch at two sizes: above ``--atol + --rtol * max|logit|`` the command exits 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcn.checkpoint import TORCHSCRIPT_META_FILE, ModelMeta, load_model
from fcn.data.io import atomic_path
from fcn.predictor import OnnxPredictor, Predictor, load_predictor

FORMATS = ("onnx", "torchscript")
# the endings --output may have, the default first (predict tells ONNX files by their .onnx ending)
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".torchscript", ".jit")}
MIN_OPSET = 17


class ExportError(ValueError):
    """A user-facing export problem (missing optional package, bad option); printed as ``error:``."""


@dataclass(frozen=True)
class ParityResult:
    """One comparison of the exported model with the PyTorch model."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float
    max_abs_logit: float
    ok: bool

    def line(self, fmt: str) -> str:
        return (
            f"parity {'x'.join(map(str, self.shape))}: max |{fmt} - torch| = {self.max_abs_diff:.3g} "
            f"(max |logit| {self.max_abs_logit:.3g}) {'ok' if self.ok else 'MISMATCH'}"
        )


def export_onnx(
    model: nn.Module,
    meta: ModelMeta,
    path: str | Path,
    *,
    size: tuple[int, int] = (360, 480),
    opset: int = 17,
) -> Path:
    """Write ``model`` as ONNX (``input`` -> ``logits``, dynamic N, H, W; traced at ``size``), ``meta`` in."""
    if opset < MIN_OPSET:
        raise ExportError(f"--opset must be at least {MIN_OPSET}, got {opset}")
    try:
        import onnx
    except ImportError as err:
        raise ExportError("ONNX export needs the onnx package: `pip install onnx onnxruntime`") from err
    path = Path(path)
    model = model.eval().cpu()
    example = torch.randn(1, 3, *size)
    axes = {0: "batch", 2: "height", 3: "width"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about the shape checks in the crops
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": axes, "logits": axes},
            )
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, meta.to_onnx_props())
        proto.producer_name = "fcn"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        _stop_if_signalled()
    return path


def export_torchscript(
    model: nn.Module, meta: ModelMeta, path: str | Path, *, size: tuple[int, int] = (360, 480)
) -> Path:
    """Write ``model`` traced at ``size`` with TorchScript (shapes stay dynamic), ``meta`` in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    example = torch.randn(1, 3, *size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings, and torch.jit's deprecation (still supported)
        traced = torch.jit.trace(model, example, check_trace=False)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_META_FILE: meta.to_json()})
            _stop_if_signalled()
    return path


def check_parity(
    model: nn.Module,
    path: str | Path,
    *,
    fmt: str,
    checks: Sequence[tuple[int, int, int]],
    atol: float = 1e-3,
    rtol: float = 1e-4,
    seed: int = 0,
) -> list[ParityResult] | None:
    """Compare the exported file, run as predict runs it (fp32, CPU), with ``model`` on random input for
    each ``(batch, H, W)``; None for ONNX without onnxruntime."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return None
    cpu = torch.device("cpu")
    if fmt == "onnx":
        run: Predictor = OnnxPredictor(path, device=cpu)
    else:
        run = load_predictor(path, device=cpu, channels_last=False)
    gen = torch.Generator().manual_seed(seed)
    results = []
    model = model.eval().cpu()
    for n, h, w in checks:
        x = torch.randn(n, 3, h, w, generator=gen)
        with torch.inference_mode():
            ref = model(x).float()
            out = run(x).float()
        diff = float((out - ref).abs().max()) if out.shape == ref.shape else float("inf")
        scale = float(ref.abs().max())
        results.append(ParityResult((n, 3, h, w), diff, scale, diff <= atol + rtol * scale))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export", description="Export a checkpoint to ONNX or TorchScript.")
    parser.add_argument("--checkpoint", required=True, help="training .ckpt")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output", type=Path, help="output file (default: the checkpoint's, .onnx / .pt)")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), default=(360, 480), help="trace size"
    )
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset (at least {MIN_OPSET})")
    parser.add_argument("--atol", type=float, default=1e-3, help="parity tolerance (absolute)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="parity tolerance (relative to max |logit|)")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    return parser


_signalled: list[int] = []  # signals main's handler took; Python drops (prints) what a handler raises inside
# a weakref callback or __del__, so the writers look here before they commit a file


def _unwind(signum: int, _frame: object) -> None:
    _signalled.append(signum)
    raise SystemExit(128 + signum)


def _stop_if_signalled() -> None:
    """Raise the exit of a signal whose first SystemExit Python dropped, before the file is committed."""
    if _signalled:
        raise SystemExit(128 + _signalled[0])


def main(argv: list[str]) -> int:
    """The export command: 0 on success, 1 when the parity check fails, 2 for a user error."""
    args = build_parser().parse_args(argv)
    # SIGTERM (main thread only) exits like Ctrl-C, so atomic_path removes the temporary file
    main_thread = threading.current_thread() is threading.main_thread()
    _signalled.clear()
    previous = signal.signal(signal.SIGTERM, _unwind) if main_thread else None
    hook = sys.unraisablehook

    def quiet_dropped_exit(unraisable: Any) -> None:  # _stop_if_signalled raises it again
        if not (_signalled and isinstance(unraisable.exc_value, SystemExit)):
            hook(unraisable)

    sys.unraisablehook = quiet_dropped_exit
    try:
        return _main(args)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.unraisablehook = hook
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def check_output(output: Path, checkpoint: Path, fmt: str) -> None:
    """Refuse an ``output`` that is a folder, is the checkpoint itself (also through a link) or whose
    ending does not match ``fmt``."""
    if output.is_dir():
        raise ExportError(f"--output {output} is a folder; give a file name")
    allowed = SUFFIXES[fmt]
    if output.suffix.lower() not in allowed:
        raise ExportError(
            f"--output {output} does not end in {' / '.join(allowed)}, the ending of --format {fmt}; "
            f"e.g. --output {output.with_suffix(allowed[0])}"
        )
    linked = output.exists() and checkpoint.exists() and os.path.samefile(output, checkpoint)  # hard links
    if linked or output.resolve() == checkpoint.resolve():
        raise ExportError(f"--output {output} is the checkpoint itself; give another file name")


def _main(args: argparse.Namespace) -> int:
    if min(args.size) < 1:
        raise ExportError(f"--size needs positive H W, got {args.size}")
    checkpoint = Path(args.checkpoint).expanduser()
    output = (args.output or checkpoint.with_suffix(SUFFIXES[args.format][0])).expanduser()
    check_output(output, checkpoint, args.format)
    model, meta = load_model(checkpoint, device="cpu")
    h, w = size = (args.size[0], args.size[1])
    try:
        if args.format == "onnx":
            export_onnx(model, meta, output, size=size, opset=args.opset)
            detail = f"opset {args.opset}, dynamic batch/height/width"
        else:
            export_torchscript(model, meta, output, size=size)
            detail = "traced, dynamic batch/height/width"
    except OSError as err:
        raise PermissionError(
            f"cannot write {output} ({err.strerror or err}); choose another --output"
        ) from err
    mb = output.stat().st_size / 2**20
    print(f"exported {meta.model_name} to {args.format} ({detail}): {output} ({mb:.1f} MB)")
    if args.no_check:
        return 0
    checks = [(1, h, w), (2, max(33, h * 2 // 3) | 1, max(33, w * 2 // 3 + 2) | 1)]  # + a smaller odd size
    results = check_parity(model, output, fmt=args.format, checks=checks, atol=args.atol, rtol=args.rtol)
    if results is None:
        print("parity check skipped: onnxruntime is not installed (`pip install onnxruntime`)")
        return 0
    for r in results:
        print(r.line(args.format))
    if not all(r.ok for r in results):
        print(
            f"error: the export differs from the checkpoint by over {args.atol} + {args.rtol} * max|logit|",
            file=sys.stderr,
        )
        return 1
    return 0
