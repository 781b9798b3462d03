"""Speed, FLOPs and memory of the registered models (and torchvision peers), side by side in one run.

``python scripts/benchmark.py --models fcn8s fcn8s:paper student --size 360 480`` prints a Markdown table
(parameters, GFLOPs, batch-1 latency, throughput, a training step, peak memory, GFLOP/s as a share of a
matmul peak measured here) and writes JSON. Also ``predict --benchmark``: the pipeline vs the bare forward.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcn.data.io import probe_size, write_bytes_atomic
from fcn.inputs import InputItem
from fcn.models import ModelError, build_model, list_models
from fcn.pipeline import PredictError, PredictOptions, run_predict
from fcn.predictor import PRECISIONS, InferenceError, Predictor, resolve_device
from fcn.scoring import sync
from fcn.tuning import cpu_has_native_bf16, keeps_freed_memory, release_freed_memory

PEERS = ("fcn_resnet50", "lraspp_mobilenet_v3_large")
DEFAULT_MODELS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s:paper", "student", *PEERS)


@dataclass
class Result:
    model: str
    size: tuple[int, int]
    params_m: float
    gflops: float
    latency_ms_median: float
    latency_ms_p90: float
    throughput_ips: float
    batch: int
    train_step_ms: float | None
    peak_mem_mb: float
    achieved_gflops_s: float
    share_of_peak: float


class _PeerWrapper(nn.Module):
    """torchvision segmentation models return a dict; expose the ``out`` logits like ours."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def make_model(spec: str, *, num_classes: int) -> nn.Module:
    """Build a model from a benchmark spec (``fcn8s``, ``fcn8s:paper``, ``student``, a torchvision peer)."""
    name, _, mode = _check_spec(spec).partition(":")
    if name in PEERS:
        import torchvision.models.segmentation as seg

        return _PeerWrapper(getattr(seg, name)(weights=None, weights_backbone=None, num_classes=num_classes))
    return build_model(name, num_classes=num_classes, **({"mode": mode} if mode else {}))


def _check_spec(spec: str) -> str:
    """``spec`` itself, or a :class:`ModelError` naming the known models."""
    if spec.partition(":")[0] not in [*list_models(), *PEERS]:
        raise ModelError(
            f"unknown model {spec!r}; choose from {list_models() + list(PEERS)} (fcn*s:paper too)"
        )
    return spec


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        gc.collect()
        release_freed_memory()  # memory the previous model freed must not count as this one's
        with contextlib.suppress(OSError):  # not Linux: the peak then covers the whole process
            Path("/proc/self/clear_refs").write_text("5")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timeit(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def count_gflops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward GFLOPs (multiply-add = 2 FLOPs) counted by ``torch.utils.flop_counter``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(device: torch.device, *, precision: str = "fp32") -> float:
    """Best GFLOP/s of a large matrix product on this machine and dtype, the reference 'peak': the faster of
    ``torch.matmul`` and the same product as a 1x1 convolution (on AMD CPUs MKL reaches half of oneDNN)."""
    n, iters = (8192 if device.type == "cuda" else 4096), 10
    dtype = PRECISIONS[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(_timeit(lambda: a @ b, device, warmup=2, iters=iters))
    side = int(n**0.5)  # (1, n, side, side) activations x (n, n) weights = an n x n x side^2 GEMM
    conv = nn.Conv2d(n, n, 1, bias=False).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(1, n, side, side, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv_best = min(_timeit(lambda: conv(x), device, warmup=2, iters=iters))
    return max(2 * n**3 / best, 2 * n * n * side * side / conv_best) / 1e9


def bench_model(
    spec: str,
    *,
    size: tuple[int, int],
    num_classes: int = 11,
    device: torch.device,
    precision: str = "fp32",
    batch: int = 4,
    channels_last: bool = False,
    compile: bool = False,
    iters: int = 5,
    train: bool = True,
    peak_gflops: float,
) -> Result:
    """Measure one model (a ``spec`` of :func:`make_model`) at one size: the figures of a :class:`Result`.
    Peak memory is CUDA's max allocated, or on CPU the peak RSS, reset per model."""
    torch.manual_seed(0)
    _reset_peak(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = make_model(spec, num_classes=num_classes).to(device, memory_format=fmt)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    h, w = size
    x1 = torch.randn(1, 3, h, w, device=device).contiguous(memory_format=fmt)
    xb = torch.randn(batch, 3, h, w, device=device).contiguous(memory_format=fmt)
    model.eval()
    gflops = count_gflops(model, x1)
    run = torch.compile(model) if compile else model
    with torch.inference_mode(), _autocast(device, precision):
        lat = _timeit(lambda: run(x1), device, warmup=2, iters=iters)
        thr = _timeit(lambda: run(xb), device, warmup=1, iters=max(2, iters // 2))
    step_ms = None
    if train:
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
        target = torch.randint(0, num_classes, (batch, h, w), device=device)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with _autocast(device, precision):
                loss = F.cross_entropy(run(xb), target)
            loss.backward()
            opt.step()

        step_ms = round(statistics.median(_timeit(step, device, warmup=1, iters=max(2, iters // 2))) * 1e3, 1)
    median = statistics.median(lat)
    p90 = sorted(lat)[min(len(lat) - 1, round(0.9 * (len(lat) - 1)))]
    ips = batch / statistics.median(thr)
    achieved = gflops * ips
    return Result(
        model=spec,
        size=(h, w),
        params_m=round(params, 3),
        gflops=round(gflops, 2),
        latency_ms_median=round(median * 1e3, 1),
        latency_ms_p90=round(p90 * 1e3, 1),
        throughput_ips=round(ips, 2),
        batch=batch,
        train_step_ms=step_ms,
        peak_mem_mb=round(_peak_mb(device), 1),
        achieved_gflops_s=round(achieved, 1),
        share_of_peak=round(achieved / peak_gflops, 3),
    )


def markdown_table(results: Sequence[Result]) -> str:
    head = (
        "| model | size | params (M) | GFLOPs | latency b1 median / p90 (ms) | images/s (batch) "
        "| train step (ms) | peak mem (MB) | GFLOP/s | of matmul peak |"
    )
    rows = [head, "|" + "---|" * 10]
    for r in results:
        step = "-" if r.train_step_ms is None else f"{r.train_step_ms:.0f}"
        rows.append(
            f"| {r.model} | {r.size[0]}x{r.size[1]} | {r.params_m:.2f} | {r.gflops:.1f} "
            f"| {r.latency_ms_median:.1f} / {r.latency_ms_p90:.1f} | {r.throughput_ips:.2f} ({r.batch}) "
            f"| {step} | {r.peak_mem_mb:.0f} | {r.achieved_gflops_s:.0f} | {100 * r.share_of_peak:.0f}% |"
        )
    return "\n".join(rows)


def ratio_lines(results: Sequence[Result]) -> list[str]:
    """The side-by-side ratios the project's goals are stated in."""
    by = {(r.model, r.size): r for r in results}
    lines = []
    for (name, size), r in by.items():
        at = f"at {size[0]}x{size[1]}"
        if name == "fcn8s" and (p := by.get(("fcn8s:paper", size))):
            lines.append(
                f"fcn8s aligned vs paper {at}: {r.throughput_ips / p.throughput_ips:.2f}x throughput, "
                f"{p.gflops / r.gflops:.2f}x fewer GFLOPs"
            )
        if name == "student" and (t := by.get(("fcn8s", size))):
            lines.append(
                f"student vs fcn8s {at}: 1/{t.gflops / r.gflops:.0f} GFLOPs, 1/{t.params_m / r.params_m:.0f} "
                f"params, {t.latency_ms_median / r.latency_ms_median:.1f}x lower latency"
            )
    return lines


def backbone_conv_efficiency(
    *, size: tuple[int, int], device: torch.device, batch: int = 1, iters: int = 3, peak_gflops: float
) -> dict[str, float]:
    """GFLOP/s of the VGG16 convolutions (conv1_1 .. fc7) alone, as a share of the matmul peak."""
    from fcn.models.vgg import VGG16Backbone

    net = VGG16Backbone().to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
    gflops = count_gflops(net, x)
    with torch.inference_mode():
        sec = min(_timeit(lambda: net(x), device, warmup=1, iters=iters))
    return {"gflops": gflops, "gflops_s": gflops / sec, "share_of_peak": gflops / sec / peak_gflops}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model specs (see module doc)")
    p.add_argument("--size", nargs=2, type=int, action="append", metavar=("H", "W"), help="repeatable")
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--batch", type=int, default=4, help="batch size of the throughput and train-step runs")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--backbone-efficiency", action="store_true", help="also measure VGG16 conv GFLOP/s")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = [tuple(s) for s in (args.size or [[360, 480]])]
    for spec in args.models:  # fail before measuring anything
        _check_spec(spec)
    if device.type == "cpu" and args.precision == "bf16" and not cpu_has_native_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 is emulated and much slower")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        peak = matmul_peak_gflops(device, precision=args.precision)
        cpu = platform.processor() or platform.machine()
        env = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "precision": args.precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "matmul_peak_gflops_s": round(peak, 1),
            "cpu_native_bf16": cpu_has_native_bf16(),
            "malloc_keeps_freed_memory": keeps_freed_memory(),  # fcn.tuning.keep_freed_memory
        }
        print(f"# {json.dumps(env)}")
        flags = ("num_classes", "precision", "batch", "channels_last", "compile", "iters")
        options = {flag: getattr(args, flag) for flag in flags}
        options.update(device=device, train=not args.no_train, peak_gflops=peak)
        results = []
        for size, spec in itertools.product(sizes, args.models):
            results.append(r := bench_model(spec, size=size, **options))
            print(f"  measured {spec} at {size[0]}x{size[1]}: {r.throughput_ips:.2f} images/s", flush=True)
        extra = {}
        if args.backbone_efficiency:
            extra = backbone_conv_efficiency(size=sizes[0], device=device, batch=args.batch, peak_gflops=peak)
    finally:
        torch.set_num_threads(threads)
    print(markdown_table(results))
    for line in ratio_lines(results):
        print(line)
    if extra:
        print(
            f"VGG16 convolutions at {sizes[0][0]}x{sizes[0][1]}: {extra['gflops_s']:.0f} GFLOP/s = "
            f"{100 * extra['share_of_peak']:.0f}% of the {peak:.0f} GFLOP/s matmul peak"
        )
    if args.json:
        payload = {"env": env, "results": [asdict(r) for r in results], "backbone": extra}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.json, json.dumps(payload, indent=2).encode())
    return 0


# -- predict --benchmark: the pipeline against the bare forward pass ------------------------------------
class StageTimes:
    """The ``timer`` of :func:`fcn.pipeline.run_predict`: the forward passes' wall time and the CPU time,
    summed over threads, of each stage: ``decode`` (read + decode), ``normalise`` (``cv2.LUT`` into the
    batch), ``arg-max``, ``encode`` (label/colour PNGs), ``write`` (temporary file, rename), ``other
    outputs`` (overlay, confidence)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.forward_wall = 0.0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - start
            with self._lock:
                self.cpu[stage] += spent


def benchmark_predict(
    predictor: Predictor,
    items: Sequence[InputItem],
    options: PredictOptions,
    *,
    repeats: int = 3,
    rewrite: bool = False,
) -> dict[str, Any]:
    """Predict throughput against the bare forward pass, in one process: ``repeats`` full runs of
    :func:`~fcn.pipeline.run_predict` (warm-up included) alternating with :func:`benchmark_forward`.
    Later runs write into a temporary folder inside ``options.output`` (removed), or with ``rewrite`` over
    the first run's files. Returns the medians ``predict_ips``, ``forward_ips`` and ``share`` (of the
    per-repeat ratios), the per-repeat ``runs`` and page ``faults`` per image, ``stages`` (ms per image),
    ``forward_wall``, ``overlap`` and the first run's ``failed`` count."""
    if repeats < 1:
        raise PredictError(f"--benchmark needs at least 1 repeat, got {repeats}")
    runs: list[tuple[float, float]] = []
    faults: list[tuple[float, float]] = []
    stages = StageTimes()
    done = failed = 0
    forward_images = (_forward_batches(items, options.batch_size) + 1) * options.batch_size  # + warm-up
    for i in range(repeats):
        fresh = (
            None if i == 0 or rewrite else Path(tempfile.mkdtemp(prefix=".benchmark-", dir=options.output))
        )
        run = replace(options, output=fresh or options.output, skip_existing=False, progress=False)
        start = _page_faults()
        try:
            summary = run_predict(predictor, items, run, timer=stages)
        finally:
            if fresh is not None:
                shutil.rmtree(fresh)
        done += summary.done
        failed = summary.failed if i == 0 else failed
        if not summary.done:
            raise PredictError("--benchmark: no image could be predicted")
        print(summary.line())
        middle = _page_faults()
        runs.append((summary.images_per_second, benchmark_forward(predictor, items, options)))
        faults.append(((middle - start) / len(items), (_page_faults() - middle) / forward_images))
    return {
        "predict_ips": statistics.median(p for p, _ in runs),
        "forward_ips": statistics.median(f for _, f in runs),
        "share": statistics.median(p / f for p, f in runs),
        "runs": runs,
        "faults": faults,
        "stages": {name: 1e3 * t / max(done, 1) for name, t in stages.cpu.items()},
        "forward_wall": 1e3 * stages.forward_wall / max(done, 1),
        "failed": failed,
        "overlap": summary.overlap,
    }


def predict_report_lines(
    report: dict[str, Any], options: PredictOptions, *, repeats: int, rewrite: bool
) -> list[str]:
    """The lines ``predict --benchmark`` prints for :func:`benchmark_predict`'s report."""
    lines = [
        f"benchmark run {i}: predict {p:.2f} images/s, bare forward {f:.2f} images/s; "
        f"page faults per image {pf:.0f} / {ff:.0f}"
        for i, ((p, f), (pf, ff)) in enumerate(zip(report["runs"], report["faults"]), 1)
    ]
    lines.append(
        f"benchmark: predict {report['predict_ips']:.2f} images/s, bare forward {report['forward_ips']:.2f} "
        f"images/s at batch {options.batch_size} (same process, medians of {repeats}) -> "
        f"{100 * report['share']:.1f}%"
    )
    order = ("decode", "normalise", "arg-max", "encode", "write", "other outputs")
    stages = report["stages"]
    parts = ", ".join(f"{name} {stages[name]:.2f}" for name in order if name in stages)
    lines.append(
        f"benchmark: per image, CPU ms by stage (all threads) {parts}, total {sum(stages.values()):.2f}; "
        f"forward {report['forward_wall']:.2f} ms wall"
    )
    spin = os.environ.get("GOMP_SPINCOUNT") or os.environ.get("OMP_WAIT_POLICY") or "libgomp default"
    overlap = report["overlap"]
    lines.append(
        f"benchmark: OpenMP spin-wait {spin}, {torch.get_num_threads()} threads, overlap {overlap}, malloc "
        f"{'keeps freed memory' if keeps_freed_memory() else 'default'}, "
        f"{'replacing existing files' if rewrite else 'new files'}"
    )
    return lines


def _page_faults() -> int:
    """This process's page faults so far (minor + major; 0 where ``resource`` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def _forward_batches(items: Sequence[InputItem], batch_size: int) -> int:
    """Batches the bare forward times: as many images as the predict run (at least two batches)."""
    return max(2, -(-len(items) // batch_size))


def benchmark_forward(predictor: Predictor, items: Sequence[InputItem], options: PredictOptions) -> float:
    """Bare forward images/s with the run's batch size, strategy and first image's size, on random
    normalised batches: as many images as the predict run (at least two batches), after one warm-up."""
    size = options.resize or probe_size(items[0].path)
    if size is None:
        raise PredictError(f"cannot read the size of {items[0].path} for --benchmark")
    x = torch.randn(options.batch_size, 3, *size, device=predictor.device)
    predictor.logits(x, **options.strategy())  # warm-up
    sync(predictor.device)
    batches = _forward_batches(items, options.batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        predictor.logits(x, **options.strategy())
    sync(predictor.device)
    return batches * options.batch_size / max(time.perf_counter() - start, 1e-9)
