"""What each device gets: precision, compilation and the other speed switches, chosen from the hardware, and the
checks and messages around them (a resumed run's device, the pace on a terminal). A reader of the loop may skip this.

    device (CUDA compute capability)            precision                   torch.compile   channels_last, fused SGD
    A100, H100, H200, RTX 30/40 (8.0 and up)    bf16 autocast               on              on
    T4 and RTX 20 (7.5)                         fp16 autocast + GradScaler  on              on
    V100 (7.0), P100 (6.0) and older            refused by torch's CUDA 12.8 and 13 builds (2.11 on), which lack
                                                their kernels; a CUDA 12.6 build: fp16 + GradScaler, compiled from 7.0
    CPU                                         fp32                        off             off

bf16 has tensor cores from 8.0 on (below, it is emulated); fp16 with loss scaling is the answer on 7.x; Triton needs
7.0. fp32 is IEEE float32 (TF32, cuDNN's default on 8.0+, off and recorded: config "tf32"); the losses are float32
always. A flag given always wins."""
import argparse
import contextlib
import re
import sys
import time

import torch

import data

PRECISIONS = ("bf16", "fp16", "fp32")
NATIVE_BF16, TRITON = (8, 0), (7, 0)  # the compute capabilities each needs
# what a CPU runs instead of the recipe: a short real-data experiment (the README's "No GPU?" line)
CPU_EXPERIMENT = "python train.py --teacher resnet20 --student resnet8 --train-subset 10000 --epochs 10"
CPU_LIMIT_H = 4  # a CPU job estimated longer is refused (a run of days is a mistake more often than a plan)


def has_kernels_for(capability, arch_list):
    """Whether a torch built for arch_list (["sm_75", "sm_80", ..., "compute_90"]) runs on a GPU of `capability`:
    a binary for sm_XY runs on X.Y' for Y' >= Y (the same major), PTX (compute_XY) is compiled for any later one."""
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        number = re.sub(r"\D", "", digits)  # sm_90a: 90
        major, minor = int(number[:-1] or 0), int(number[-1:] or 0)
        if (kind == "sm" and major == capability[0] and minor <= capability[1]) or \
                (kind == "compute" and (major, minor) <= tuple(capability)):
            return True
    return not arch_list  # a build that lists nothing: nothing to check against


def check(device):
    """Refuse a --device this machine or this torch cannot train on, before anything is loaded; make a CUDA device
    the current one, so that everything acting on "the" device (RNG states, synchronize, memory) acts on it."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        sys.exit(f"error: --device {device!r} is not a device name torch knows: use cpu, cuda, or cuda:N")
    if parsed.type not in ("cpu", "cuda"):
        sys.exit(f"error: --device {device}: this project trains on cpu or cuda")
    if parsed.type == "cpu":
        return
    if not torch.cuda.is_available():
        sys.exit(f"error: --device {device}, but torch {torch.__version__} sees no CUDA device here: drop --device to "
                 f"train on the CPU, or install a CUDA build of torch on a machine with an NVIDIA GPU")
    if (parsed.index or 0) >= torch.cuda.device_count():
        sys.exit(f"error: --device {device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    capability, arch_list = torch.cuda.get_device_capability(device), torch.cuda.get_arch_list()
    if not has_kernels_for(capability, arch_list):
        sys.exit(f"error: {torch.cuda.get_device_name(device)} (compute capability {'%d.%d' % capability}) cannot "
                 f"run this torch {torch.__version__}: it carries kernels for {', '.join(arch_list)} only, so its "
                 f"first CUDA kernel would fail (\"no kernel image is available\"). Install a torch build for this GPU "
                 f"(an older CUDA variant: pytorch.org's install selector lists each one's GPUs), or use --device cpu")
    torch.cuda.set_device(parsed.index or 0)  # "cuda" alone is device 0 (set_device wants an index)


def add_flags(parser):
    """--device and the speed switches, whose defaults choose() takes from the device."""
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present)")
    parser.add_argument("--allow-slow", action="store_true", help=f"train on a CPU even where the job's estimate "
                        f"exceeds {CPU_LIMIT_H} hours (refused otherwise)")
    speed = parser.add_argument_group("speed (defaults chosen from the device: see devices.py)")
    speed.add_argument("--precision", choices=PRECISIONS, help="autocast of the networks (default bf16 on GPUs of "
                       "compute capability 8.0+, fp16 with loss scaling on older GPUs, fp32 on the CPU)")
    for name, what in (("channels-last", "channels_last memory format (default on CUDA)"),
                       ("compile", "torch.compile of the step (default on CUDA of capability 7.0+)"),
                       ("fused-sgd", "the SGD update in one fused kernel, else foreach (default on CUDA)")):
        speed.add_argument("--" + name, action=argparse.BooleanOptionalAction, help=what)


def choose(device, args):
    """The speed switches of a run on `device` (the table above), each overridden by its flag where one was given;
    returns them with the device's name and capability, and the lines saying what was chosen."""
    if not device.startswith("cuda"):
        name, capability = "cpu", None
        default = {"precision": "fp32", "compile": False, "channels_last": False, "fused_sgd": False}
    else:
        name, capability = torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))
        default = {"precision": "bf16" if capability >= NATIVE_BF16 else "fp16", "compile": capability >= TRITON,
                   "channels_last": True, "fused_sgd": True}
    chosen = {key: default[key] if getattr(args, key) is None else getattr(args, key) for key in default}
    # IEEE float32 wherever float32 runs: the paper's arithmetic for fp32, and the losses' under autocast
    chosen.update(device_name=name, capability=None if capability is None else "%d.%d" % capability, tf32=False)
    lines = [line(chosen)]
    if capability and chosen["precision"] == "bf16" and capability < NATIVE_BF16:
        lines.append(f"warning: --precision bf16 on {name}, which has no native bf16 (compute capability below 8.0): "
                     f"torch emulates it, slowly; --precision fp16 (the default here) runs on its tensor cores")
    if not capability and chosen["precision"] == "fp16":
        lines.append("warning: --precision fp16 on the CPU: emulated, slower than --precision fp32 (a test of fp16)")
    return chosen, lines


def resumed(config, recorded, out):
    """A resumed run's config on this device, of the type it `recorded` (random streams differ between devices)."""
    if torch.device(config["device"]).type != torch.device(recorded).type:
        sys.exit(f"error: {out} ran on {recorded}; it can only resume there")
    if recorded.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: {out} ran on {recorded}, and this machine has no CUDA device to resume it on")
    check(config["device"])  # a recorded cuda:1 on a one-GPU machine: --device cuda:0 resumes it there
    gpu = config["device"].startswith("cuda")
    return dict(config, device_name=torch.cuda.get_device_name(config["device"]) if gpu else "cpu",
                capability="%d.%d" % torch.cuda.get_device_capability(config["device"]) if gpu else None)


def line(config):
    """What a run's device gets, in one line: "device: Tesla T4 (compute capability 7.5): fp16 autocast ..."."""
    where = config["device_name"] + (f" (compute capability {config['capability']})" if config["capability"] else "")
    precision = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}.get(config["precision"], "fp32")
    return f"device: {where}: {precision}; {'compiled' if config['compile'] else 'eager'}"


def apply(config):
    """Process-wide: cuDNN autotuning (fixed input shapes: each one's fastest kernels picked once), TF32 as recorded."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = config.get("tf32", False)


def synchronize(device):
    """Wait for the device's queued kernels (CUDA runs asynchronously), so that a time read next is theirs."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast(config):
    """The autocast of the run's networks: bf16 or fp16 per --precision, none for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["precision"])
    return torch.autocast(torch.device(config["device"]).type, dtype or torch.float32, enabled=dtype is not None)


def shown(loader, stream=None):
    """The loader's batches; on a terminal only (never into a log or CI), one line redrawn each second or so with the
    step, the images per second and the epoch's time left, erased before the epoch's line or whatever ends it."""
    stream = stream or sys.stderr  # sys.stderr as it is now (None where a daemon closed it)
    tty, started, drawn, images = stream is not None and stream.isatty(), time.perf_counter(), 0.0, 0
    try:
        for step, batch in enumerate(loader, 1):
            yield batch
            images += len(batch[1])
            if tty and time.perf_counter() - drawn > 1:
                rate = images / max((drawn := time.perf_counter()) - started, 1e-6)  # on CUDA: the pace of launches
                left = (loader.num_samples - images) / rate
                print(f"\r\033[K  step {step}/{len(loader)}  {rate:.0f} img/s  {left:.0f}s left in this epoch", end="",
                      file=stream, flush=True)  # \033[K: what a longer line before left is erased
    finally:  # an exception or a stop too: its message starts on a clean line
        if tty and drawn:
            print("\r\033[K", end="", file=stream, flush=True)


def duration(seconds):
    """A duration as a person reads it: minutes below 2 h, hours up to 48 h, then days."""
    hours = seconds / 3600
    return f"{seconds / 60:.0f} min" if hours < 2 else f"{hours:.1f} h" if hours <= 48 else f"{hours / 24:.1f} days"


def advise_cpu(config, teacher_config, step_seconds, allow_slow=False):
    """On the CPU, before any heavy work: how long the job takes here; refused beyond CPU_LIMIT_H unless allow_slow.
    teacher_config: the recipe of a teacher the job trains first, or None; step_seconds(config) times one step."""
    images = config["train_subset"] or data.FAKE_SIZES.get(config["dataset"], (50_000,))[0]  # training images
    parts = {f"the teacher {config['teacher']}": teacher_config} if teacher_config else {}
    parts[f"{config['student']} {'alone' if config['method'] == 'none' else config['method']}"] = config
    if len(parts) * config["epochs"] * images < 100_000:  # a tiny job (a smoke run, a test) is not timed
        return
    seconds = [step_seconds(part) * config["epochs"] * -(-images // config["batch_size"]) for part in parts.values()]
    plan, long = ", then ".join(f"{what} ({duration(s)})" for what, s in zip(parts, seconds)), sum(seconds) > \
        CPU_LIMIT_H * 3600
    estimate = (f"no CUDA device: on this CPU the job needs about {duration(sum(seconds))} ({plan}, {config['epochs']} "
                f"epochs{' each' if len(parts) > 1 else ''}, at the pace of a few steps timed here)")
    if long and not allow_slow:
        sys.exit(f"error: {estimate}. A CPU suits a short real-data experiment instead (the README's 'No GPU?'): "
                 f"{CPU_EXPERIMENT}; to train this job here anyway, add --allow-slow")
    print(f"{'warning' if long else 'note'}: {estimate}", flush=True)


@contextlib.contextmanager
def compile_failures_explained(config, resumed):
    """A torch.compile failure in the block (dynamo's, inductor's or Triton's, which the lazily compiled backward raises
    unwrapped: a C++ compiler missing or failing, a GPU too old) exits naming --no-compile: no silent fallback."""
    try:
        yield
    except Exception as error:
        if not config["compile"] or not (isinstance(error, torch._dynamo.exc.TorchDynamoException)
                                         or type(error).__module__.startswith(("torch._inductor", "triton"))):
            raise
        first_lines = " | ".join(line.strip() for line in str(error).strip().splitlines()[:3] if line.strip())
        sys.exit(f"error: torch.compile failed on the training step ({type(error).__name__}: {first_lines[:500]}). "
                 f"Run the same command with --no-compile{' --resume' if resumed else ''}: the same training, slower")
