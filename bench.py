"""Time distillation training steps: the field's reference-style pipeline against this project's train.py step.

    python bench.py --teacher resnet32x4 --student resnet8x4            # on a GPU: the speed table of the README
    python bench.py --device cpu                                        # CPU-sized defaults (the README's CPU rows)
    python bench.py --teacher resnet8 --student resnet8 --steps 3 --num-images 256 --workers 0   # CPU smoke run

(a) reference: PIL transforms (RandomCrop(32, padding=4), flip, ToTensor, Normalize) in DataLoader workers, fp32,
    eager, and a `.item()` per step, as RepDistiller-style loops do for their meters.
(b) project: train.train_step: data.Loader on the device, bf16 autocast, channels_last, torch.compile, fused SGD,
    no per-step host sync (each switched on by train.py's CUDA defaults).
(c) graphs (CUDA only): (b) with train.py --cuda-graphs, the compiled step replayed as CUDA graphs.
(d) cached (opt-in, methods with a teacher): (b) with train.py --teacher-cache: the teacher runs once on all 162 views
    of every image (the fill, timed on its own), and each step reads its features instead of running it.
Both compute the same objective (train.make_loss_fn) on synthetic uint8 images of CIFAR shape.
"""
import itertools
import os
import sys
import time
import traceback

import torch
from PIL import Image

import cli
import data
import teachers
import train

EPOCH_IMAGES, RECIPE_EPOCHS = 50_000, 240
METHOD_NAMES = {"srd": "srd", "kd": "kd", "none": "cross-entropy-only"}
MIN_STEPS, MIN_WINDOW_S = 20, 2.0  # below either, step times on a shared machine are mostly noise
# (on CUDA, on the CPU) for a flag not given: CUDA's take half an hour or more on a CPU, the CPU's minutes, with
# enough images that the reference DataLoader starts no new epoch inside a measurement ((3 + 20) x 64 < 2,000)
SIZED_DEFAULTS = {"steps": (200, 20), "warmup": (30, 3), "workers": (8, min(8, os.cpu_count() or 1)),
                  "num_images": (EPOCH_IMAGES, 2000)}


class PILImages(torch.utils.data.Dataset):
    """Images as the reference codebases see them: one HWC uint8 array per sample through PIL transforms."""

    def __init__(self, images, labels):
        from torchvision import transforms
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(data.CIFAR100_MEAN, data.CIFAR100_STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


PIPELINE_FLAGS = {"reference": ["--precision", "fp32", "--no-channels-last", "--no-compile"], "project": [],
                  "graphs": ["--cuda-graphs"], "cached": ["--teacher-cache"]}


def step_config(args, method, pipeline):
    argv = ["--student", args.student, "--method", method, "--device", args.device, *PIPELINE_FLAGS[pipeline]]
    argv += ["--teacher", args.teacher] if method != "none" else []
    return train.resolve_config(train.parse_args(argv))


def time_pipeline(args, method, pipeline, images, labels):
    """Seconds per step after warm-up, the seconds of the warm-up (compilation included), and of the teacher
    cache's fill (0 without one)."""
    optimised, cached = pipeline != "reference", pipeline == "cached"
    config = step_config(args, method, pipeline)
    torch.compiler.reset()  # a fresh compile cache each time: the step's code object allows only 8 entries
    teacher = train.build_on_device(args.teacher, config).eval().requires_grad_(False) if method != "none" else None
    student, distill, optimizer = train.build_student(config, teacher)
    loss_fn = train.make_loss_fn(student, teacher, distill, config)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=config["precision"] == "fp16")
    cache, fill_s = None, 0.0
    if optimised:
        loader = data.Loader(images, labels, args.batch_size, True, args.device, views=cached)
        batches = itertools.chain.from_iterable(itertools.repeat(loader))
        if cached:
            cache = teachers.TeacherCache(lambda images: train.teacher_forward(teacher, images, config)[1], loader)
            fill_s = cache.fill_time_s
    else:  # Ctrl-C reaches its workers too: torch's worker loop catches it and exits quietly (test_bench.py)
        loader = torch.utils.data.DataLoader(PILImages(images, labels), args.batch_size, shuffle=True,
                                             num_workers=args.workers, pin_memory=config["device"].startswith("cuda"),
                                             persistent_workers=args.workers > 0)
        batches = itertools.chain.from_iterable(itertools.repeat(loader))
        optimizer = torch.optim.SGD(optimizer.param_groups[0]["params"], lr=config["lr"], momentum=0.9,
                                    weight_decay=config["weight_decay"])  # torch's default (foreach) SGD

    def step():
        x, y, *drawn = next(batches)
        terms, correct, _ = train.train_step(loss_fn, optimizer, scaler, x.to(args.device, non_blocking=True),
                                          y.to(args.device, non_blocking=True), config,
                                          cache.lookup(*drawn) if cache else None)
        if not optimised:
            terms[3].item(), correct.item()  # the reference loops' meters: a host sync every step

    synchronize = torch.cuda.synchronize if config["device"].startswith("cuda") else (lambda: None)
    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize()
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize()
    return (time.perf_counter() - started) / args.steps, warmup, fill_s


class HelpFormatter(cli.HelpWithDefaults):
    """cli's --help, with both defaults of a device-sized flag (None until parse_args sets it)."""

    def _get_help_string(self, action):
        if action.dest in SIZED_DEFAULTS:
            on_cuda, on_cpu = SIZED_DEFAULTS[action.dest]
            return f"{action.help} (default: {on_cuda:,} on CUDA, {on_cpu:,} on the CPU)"
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = cli.Parser(prog="python bench.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--teacher", default="resnet32x4", choices=train.models.MODEL_NAMES, metavar="NAME",
                   help="teacher architecture (random weights: timing only)")
    p.add_argument("--student", default="resnet8x4", choices=train.models.MODEL_NAMES, metavar="NAME",
                   help="student architecture: " + ", ".join(train.models.MODEL_NAMES))
    p.add_argument("--methods", nargs="+", choices=train.METHODS, default=list(train.METHODS), help="objectives")
    p.add_argument("--pipelines", nargs="+", choices=PIPELINE_FLAGS, help="pipelines to time; when none "
                   "are given, reference and project, and graphs on CUDA")
    p.add_argument("--steps", type=int, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size")
    p.add_argument("--workers", type=int, help="reference DataLoader workers (RepDistiller: 8; on the CPU: its "
                   "cores, at most 8)")
    p.add_argument("--num-images", type=int, help="synthetic training images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    defaulted = {name: sizes[0 if on_cuda else 1] for name, sizes in SIZED_DEFAULTS.items() if vars(args)[name] is None}
    vars(args).update(defaulted)
    args.cpu_defaults = {} if on_cuda else defaulted  # for main's note
    if args.steps < 1 or args.warmup < 0 or args.workers < 0:
        p.error("--steps must be at least 1, --warmup and --workers at least 0")
    if args.batch_size < 2 or args.num_images < 2 or args.num_images % args.batch_size == 1:
        p.error("every batch needs two images or more (BatchNorm needs batch statistics): check --batch-size "
                "and --num-images")
    args.pipelines = args.pipelines or ["reference", "project", *(["graphs"] if on_cuda else [])]
    if "graphs" in args.pipelines and not on_cuda:
        p.error("the graphs pipeline replays CUDA graphs: it needs --device cuda")
    return args


def measure(args, measurements, results, failed):
    """Time each (pipeline, method), printing its line, and after the first a rough estimate of the rest. Fills
    results and failed in place, so that main still has what was measured when Ctrl-C interrupts."""
    torch.backends.cudnn.benchmark = True  # both pipelines, as RepDistiller and train.py set it
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 100, (args.num_images,), generator=generator)
    for done, (pipeline, method) in enumerate(measurements, 1):
        try:
            step_s, warmup_s, fill_s = time_pipeline(args, method, pipeline, images, labels)
        except Exception:  # report it and go on: one broken variant must not cost the other measurements
            traceback.print_exc()
            print(f"{method:4s} {pipeline:9s}  FAILED (traceback above)", flush=True)
            failed.append((method, pipeline))
            continue
        ips = args.batch_size / step_s
        results[method, pipeline] = {"step_ms": 1e3 * step_s, "images_per_s": ips, "warmup_s": warmup_s,
                                     "recipe_minutes": RECIPE_EPOCHS * EPOCH_IMAGES / ips / 60,
                                     "fill_minutes": fill_s * EPOCH_IMAGES / args.num_images / 60}
        fill = (f"; the cache's fill {fill_s:.1f} s for {args.num_images:,} images, "
                f"{results[method, pipeline]['fill_minutes']:.1f} min for {EPOCH_IMAGES:,}") if fill_s else ""
        print(f"{method:4s} {pipeline:9s}  {1e3 * step_s:7.2f} ms/step  {ips:9.0f} img/s  "
              f"240 epochs in {results[method, pipeline]['recipe_minutes']:7.1f} min  (warm-up {warmup_s:.1f} s{fill})",
              flush=True)
        left, took_s = len(measurements) - done, warmup_s + args.steps * step_s + fill_s
        if len(results) == 1 and left:
            print(f"estimate: {left} more measurement(s), about {left * took_s / 60:.1f} min if each takes as long as "
                  f"this one's {took_s:.1f} s of warm-up, timed steps and fill; rough, since pipelines and methods "
                  f"differ", flush=True)


def main(argv=None):
    args = parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    # reference first: its DataLoader forks workers before any compiler has started threads in this process
    pipelines = sorted(args.pipelines, key=list(PIPELINE_FLAGS).index)
    measurements = [(pipeline, method) for pipeline, method in itertools.product(pipelines, args.methods)
                    if not (pipeline == "cached" and method == "none")]  # no teacher, nothing to cache
    skipped = " (cached skips none: no teacher)" if "cached" in pipelines and "none" in args.methods else ""
    print(f"timing pipelines ({', '.join(pipelines)}) x methods ({', '.join(args.methods)}) = {len(measurements)} "
          f"measurement(s){skipped}, each {args.warmup} warm-up + {args.steps} timed steps: {args.teacher} -> "
          f"{args.student}, batch {args.batch_size}, workers {args.workers} (reference), {args.num_images:,} images, "
          f"device {torch.cuda.get_device_name(args.device) if on_cuda else 'cpu'}, torch {torch.__version__}",
          flush=True)
    if args.cpu_defaults:  # rather than CUDA's: half an hour or more on a CPU
        as_flags = lambda value: " ".join(f"--{name.replace('_', '-')} {value(name)}" for name in args.cpu_defaults)
        print(f"on the CPU, CPU-sized defaults: {as_flags(args.cpu_defaults.get)} (CUDA's: "
              f"{as_flags(lambda name: SIZED_DEFAULTS[name][0])}); give a flag to change its value", flush=True)
    results, failed = {}, []
    try:
        measure(args, measurements, results, failed)
    except KeyboardInterrupt:  # Ctrl-C: the finished measurements' lines are printed already; no traceback
        finished = ", ".join(f"{method} {pipeline}" for method, pipeline in results)
        print(f"interrupted: {len(results)} of {len(measurements)} measurements finished"
              + (f" ({finished}): their figures above stand" if results else ""), file=sys.stderr)
        sys.exit(130)
    comparisons = (("project", "reference"), ("graphs", "reference"), ("cached", "reference"), ("cached", "project"))
    for method, (pipeline, baseline) in itertools.product(args.methods, comparisons):
        if (method, baseline) in results and (method, pipeline) in results:
            ours, theirs = results[method, pipeline]["step_ms"], results[method, baseline]["step_ms"]
            print(f"{method}: {pipeline} is {theirs / ours:.2f}x as fast as {baseline} "
                  f"({baseline}'s {theirs:.1f} ms/step over {pipeline}'s {ours:.1f} ms/step)")
    for pipeline in args.pipelines:
        for baseline in ("none", "kd"):
            if ("srd", pipeline) in results and (baseline, pipeline) in results:
                srd, other = results["srd", pipeline]["step_ms"], results[baseline, pipeline]["step_ms"]
                print(f"{pipeline}: an srd step takes {srd / other:.2f}x the time of a {METHOD_NAMES[baseline]} step "
                      f"({srd:.1f} ms over {other:.1f} ms)")
    shortest = min((args.steps * r["step_ms"] / 1e3 for r in results.values()), default=0.0)
    if results and (args.steps < MIN_STEPS or shortest < MIN_WINDOW_S):
        print(f"note: a timed window of {args.steps} steps ({shortest:.2f} s at the shortest) is too short for these "
              f"figures to mean anything: take them as a smoke test, and time at least {MIN_STEPS} steps and "
              f"{MIN_WINDOW_S:.0f} s (e.g. --steps 200) for a measurement")
    if failed:
        print("failed: " + ", ".join(f"{method} {pipeline}" for method, pipeline in failed))
    return results, failed


if __name__ == "__main__":
    sys.exit(1 if main()[1] else 0)
