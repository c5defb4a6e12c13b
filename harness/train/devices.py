"""One GPU job per device on a host with several: a job claims free devices and sees only those.

Snakemake counts the ``gpu`` resource (``snakemake --resources gpu=4`` runs up to four GPU jobs
at once) but does not say which device a job gets. So each GPU rule says how many it needs,

    MOE_HARNESS_GPUS={resources.gpu} python -m harness measure STUDY --run RUN   # a harness verb
    python -m harness.devices {resources.gpu} COMMAND [ARG ...]                  # any command

and the job takes the first free devices, each by an exclusive, non-blocking ``flock`` on
``<lock folder>/<device>.lock``, then sets ``CUDA_VISIBLE_DEVICES`` to them before anything
initialises CUDA. A lock lasts as long as the process that took it (the second form hands it
on through ``exec``, so the command holds it): the kernel drops it when the process ends,
however it ends, a SIGKILL included, so a killed job frees its device at once.

    MOE_HARNESS_GPUS       devices the job needs (unset or 0: claim nothing)
    MOE_HARNESS_DEVICES    the devices to share out, comma-separated (default: every GPU NVML
                           lists, by UUID; a MIG-enabled GPU by its MIG instances)
    MOE_HARNESS_GPU_LOCKS  the lock folder (default $XDG_RUNTIME_DIR/moe-harness-gpus, else
                           <temp folder>/moe-harness-gpus-<uid>): on this host's own disk, one per user,
                           so that every workflow the user runs on the host shares it

Where ``CUDA_VISIBLE_DEVICES`` is already set, a scheduler or the user has chosen (SLURM sets it
for a job with ``--gres=gpu:N``): nothing is claimed and the job uses what it was given.

Devices are named by UUID, which ``CUDA_VISIBLE_DEVICES`` accepts: NVML numbers devices in PCI
bus order and CUDA, unless told otherwise, fastest first, so an index could name another device.
The NVML energy meter finds a job's device by the same UUID (``harness.train.energy.open_meter``).

    python -m harness.devices --list     each device, and the process holding it
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError

GPUS_ENV = "MOE_HARNESS_GPUS"
DEVICES_ENV = "MOE_HARNESS_DEVICES"
LOCKS_ENV = "MOE_HARNESS_GPU_LOCKS"
WAIT_S = 60.0
"""How long a claim waits for busy devices. Snakemake's ``gpu`` count keeps a workflow's own jobs
from waiting; another workflow or a run by hand on the same host may hold a device for longer."""


@dataclass
class Claim:
    """Devices this process holds, and the open lock files that hold them."""

    devices: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)  # closing the last descriptor of a lock file drops its lock
        self.devices, self.fds = [], []


def requested() -> int:
    """The number of devices the job asks for (``MOE_HARNESS_GPUS``; 0 when unset)."""
    text = os.environ.get(GPUS_ENV, "").strip() or "0"
    if not text.isdigit():
        raise HarnessError(f"{GPUS_ENV}={text}: must be a number of GPUs, 0 or more")
    return int(text)


def lock_folder() -> Path:
    if os.environ.get(LOCKS_ENV):
        return Path(os.environ[LOCKS_ENV])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "moe-harness-gpus"
    return Path(tempfile.gettempdir()) / f"moe-harness-gpus-{os.getuid()}"


def host_devices(nvml: Any = None) -> list[str]:
    """The devices to share out: ``MOE_HARNESS_DEVICES``, else every GPU NVML lists, by UUID.
    NVML, not torch: a CUDA runtime started here would ignore a later ``CUDA_VISIBLE_DEVICES``.
    ``nvml`` defaults to the pynvml module; tests pass a stand-in. Empty when NVML is absent."""
    given = os.environ.get(DEVICES_ENV, "")
    if given.strip():
        return [d.strip() for d in given.split(",") if d.strip()]
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return []
    try:
        return [uuid for i in range(nvml.nvmlDeviceGetCount()) for uuid in _uuids(nvml, i)]
    finally:
        nvml.nvmlShutdown()


def _uuids(nvml: Any, index: int) -> list[str]:
    """A GPU's UUID, or with MIG on, those of its MIG instances: CUDA can use only those."""
    gpu = nvml.nvmlDeviceGetHandleByIndex(index)
    try:
        mig = nvml.nvmlDeviceGetMigMode(gpu)[0] == nvml.NVML_DEVICE_MIG_ENABLE
    except nvml.NVMLError:  # NotSupported: a GPU without MIG
        mig = False
    if not mig:
        return [_text(nvml.nvmlDeviceGetUUID(gpu))]
    out = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu)):
        with suppress(nvml.NVMLError):  # NotFound: an empty slot
            out.append(_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot))))
    return out


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _lock_file(folder: Path, device: str) -> Path:
    return folder / (re.sub(r"[^A-Za-z0-9._-]", "_", device) + ".lock")


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding ``path``'s lock, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def claim(n: int, devices: list[str], folder: Path, wait_s: float | None = None, poll_s: float = 0.2) -> Claim:
    """``n`` free devices of ``devices``, locked for this process; waits up to ``wait_s`` (default
    WAIT_S) for them. All or none: a job that gets only some lets them go before it tries again,
    so two jobs that each need two devices never hold one each and wait for ever."""
    if n > len(devices):
        have = f"{len(devices)} ({', '.join(devices)})" if devices else "none (NVML lists no GPU)"
        raise HarnessError(
            f"the job needs {n} GPU(s) and this host has {have}; "
            f"set {DEVICES_ENV} or CUDA_VISIBLE_DEVICES to the devices to use, or ask for fewer"
        )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    wait_s = WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        held = Claim()
        for device in devices:
            fd = _try_lock(_lock_file(folder, device))
            if fd is None:
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}\n".encode())  # who holds it, for --list and errors
            held.devices.append(device)
            held.fds.append(fd)
            if len(held.devices) == n:
                return held
        held.release()
        if time.monotonic() >= deadline:
            busy = ", ".join(f"{d} ({_holder(_lock_file(folder, d))})" for d in devices)
            raise HarnessError(
                f"no {n} free GPU(s) after {wait_s:g} s: held are {busy} (lock files in {folder}); "
                "another workflow or a job started by hand is using them. Run fewer GPU jobs at once "
                "(snakemake --resources gpu=N) or wait for those to finish"
            )
        time.sleep(poll_s)


def pin(n: int, wait_s: float | None = None) -> Claim | None:
    """Claim ``n`` devices and make them this process's (and its children's) CUDA devices.
    None when there is nothing to claim: ``n`` is 0, or CUDA_VISIBLE_DEVICES is already set."""
    if n == 0:
        return None
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        given = os.environ["CUDA_VISIBLE_DEVICES"]
        if len([d for d in given.split(",") if d.strip()]) > n:
            print(
                f"harness: CUDA_VISIBLE_DEVICES={given} was set before this job and is used as it is: "
                f"jobs running at once share those devices. Unset it (and set {DEVICES_ENV} to choose "
                "devices) to give each job its own",
                file=sys.stderr,
            )
        return None
    if "LOCAL_RANK" in os.environ:  # each torchrun worker would take devices of its own
        raise HarnessError(
            f"{GPUS_ENV} is set in a torchrun worker: claim the devices of all its workers at once, "
            f"before torchrun starts them: python -m harness.devices {n} torchrun ..."
        )
    held = claim(n, host_devices(), lock_folder(), wait_s)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(held.devices)
    # Indices given in MOE_HARNESS_DEVICES then mean what nvidia-smi shows; UUIDs need no order.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return held


@contextmanager
def pinned(n: int, wait_s: float | None = None) -> Iterator[Claim | None]:
    """``pin`` for the length of a block: the devices are freed, and the environment as it was,
    after it."""
    before = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    held = pin(n, wait_s)
    try:
        yield held
    finally:
        if held is not None:
            held.release()
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def holder(device: str, folder: Path) -> str | None:
    """Who holds ``device`` ('pid N'), None when it is free."""
    path = _lock_file(folder, device)
    if not path.exists():
        return None
    fd = _try_lock(path)
    if fd is None:
        return _holder(path)
    os.close(fd)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.devices",
        description="Run COMMAND on N GPUs of its own: it claims N free devices, sets CUDA_VISIBLE_DEVICES "
        "and becomes COMMAND, which holds them until it ends.",
    )
    parser.add_argument("--list", action="store_true", help="list the devices and who holds each, and exit")
    parser.add_argument("gpus", nargs="?", type=int, metavar="N", help="devices the command needs (0: none)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command and its arguments")
    args = parser.parse_args(argv)
    if args.list:
        folder = lock_folder()
        for device in host_devices():
            print(f"{device}  {holder(device, folder) or 'free'}")
        print(f"(locks in {folder})")
        return 0
    if args.gpus is None or args.gpus < 0 or not args.command:
        parser.error("give N (0 or more) and a COMMAND, or --list")
    try:
        held = pin(args.gpus)
    except HarnessError as e:
        print(f"harness.devices: error: {e}", file=sys.stderr)
        return 2
    for fd in held.fds if held else []:
        os.set_inheritable(fd, True)  # the command, which replaces this process, keeps the locks
    try:
        os.execvp(args.command[0], args.command)
    except OSError as e:
        print(f"harness.devices: error: cannot run {args.command[0]}: {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
