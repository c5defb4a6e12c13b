"""GPU jobs on a multi-GPU host get devices of their own (harness.train.devices), checked without a GPU:
a host of four fake devices, jobs as real processes holding real lock files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from harness.cli import main
from harness.core.errors import HarnessError
from harness.train import devices

HOST = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd"]
HOLD = "import os, sys, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(300)"


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Four devices and a fresh lock folder, for this process and the jobs it starts."""
    monkeypatch.setenv(devices.DEVICES_ENV, ",".join(HOST))
    monkeypatch.setenv(devices.LOCKS_ENV, str(tmp_path / "locks"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return tmp_path / "locks"


@pytest.fixture
def jobs():
    """Start a job that claims N devices through the launcher and holds them; all killed after."""
    started: list[subprocess.Popen] = []

    def start(n: int = 1) -> tuple[subprocess.Popen, list[str]]:
        cmd = [sys.executable, "-m", "harness.devices", str(n), sys.executable, "-c", HOLD]
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(job)
        line = job.stdout.readline().strip()
        assert line, job.stderr.read()
        return job, line.split(",")

    yield start
    for job in started:
        job.kill()
        job.wait()


def test_concurrent_jobs_get_distinct_devices_and_a_killed_job_frees_its_own(host, jobs):
    held = [jobs(1) for _ in range(4)]
    assert sorted(d for _, (d,) in held) == HOST  # four jobs, four devices, none shared
    for job, (device,) in held:
        assert devices.holder(device, host) == f"pid {job.pid}"  # the command holds it after exec

    with pytest.raises(HarnessError, match=r"no 1 free GPU\(s\) after 0.3 s: held are GPU-aaaa \(pid \d+\)"):
        devices.claim(1, HOST, host, wait_s=0.3)  # a fifth job

    victim, (freed,) = held[2]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    again = devices.claim(1, HOST, host, wait_s=0)
    assert again.devices == [freed]
    again.release()


def test_a_waiting_job_gets_the_device_freed_while_it_waits(host, jobs):
    held = [jobs(1) for _ in range(4)]
    victim, (freed,) = held[1]
    threading.Timer(0.5, victim.kill).start()
    start = time.monotonic()
    got = devices.claim(1, HOST, host, wait_s=30, poll_s=0.05)
    assert got.devices == [freed] and time.monotonic() - start >= 0.4
    got.release()


def test_a_job_of_two_gets_two_free_devices_and_never_holds_part_of_them(host, jobs):
    first, pair = jobs(2)
    assert len(set(pair)) == 2 and set(pair) <= set(HOST)
    _, (third,) = jobs(1)
    assert third not in pair
    # One device left: a job of two waits without holding it, and a job of one still gets it.
    with pytest.raises(HarnessError, match="no 2 free GPU"):
        devices.claim(2, HOST, host, wait_s=0.2)
    last = devices.claim(1, HOST, host, wait_s=0)
    assert last.devices == sorted(set(HOST) - {*pair, third})
    last.release()
    first.kill()
    first.wait()
    second_pair = devices.claim(2, HOST, host, wait_s=0)
    assert sorted(second_pair.devices) == sorted(pair)
    second_pair.release()


def test_pinned_sets_cuda_visible_devices_for_the_block_and_frees_the_device_after(host):
    with devices.pinned(2) as held:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb" == ",".join(held.devices)
        assert devices.holder("GPU-aaaa", host) == f"pid {os.getpid()}"
        assert devices.claim(2, HOST, host, wait_s=0).devices == ["GPU-cccc", "GPU-dddd"]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and "CUDA_DEVICE_ORDER" not in os.environ
    assert devices.holder("GPU-aaaa", host) is None


def test_a_device_set_by_the_scheduler_is_used_as_it_is(host, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # SLURM's choice for a --gres=gpu:1 job
    with devices.pinned(1) as held:
        assert held is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not host.exists()  # nothing claimed
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with devices.pinned(1):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "share those devices" in capsys.readouterr().err
    with devices.pinned(0) as held:
        assert held is None


def test_clear_errors(host, monkeypatch):
    with pytest.raises(HarnessError, match=r"needs 5 GPU\(s\) and this host has 4 \(GPU-aaaa"):
        devices.claim(5, HOST, host)
    with pytest.raises(HarnessError, match="has none"):
        devices.claim(1, [], host)
    monkeypatch.setenv(devices.GPUS_ENV, "two")
    with pytest.raises(HarnessError, match="MOE_HARNESS_GPUS=two"):
        devices.requested()
    monkeypatch.setenv(devices.GPUS_ENV, "")
    assert devices.requested() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(HarnessError, match="torchrun worker"):
        devices.pin(1)


def test_a_gpu_verb_claims_before_it_starts(host, monkeypatch, capsys):
    """The hook in harness.cli.main: a GPU verb with MOE_HARNESS_GPUS waits for a device, then
    fails with one line; other verbs ignore it."""
    everything = devices.claim(4, HOST, host)
    monkeypatch.setenv(devices.GPUS_ENV, "1")
    monkeypatch.setattr(devices, "WAIT_S", 0.2)
    assert main(["measure", "no-such-study", "--run", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness measure: error: no 1 free GPU(s)") and err.count("\n") == 1
    assert main(["count", "no-such-model.yaml"]) == 2
    assert "free GPU" not in capsys.readouterr().err
    everything.release()


def test_host_devices_lists_gpus_by_uuid_and_mig_instances_in_place_of_their_gpu(monkeypatch):
    monkeypatch.delenv(devices.DEVICES_ENV, raising=False)

    class NotFound(Exception):
        pass

    gpus = [{"uuid": "GPU-0"}, {"uuid": "GPU-1", "mig": [b"MIG-1a", None, b"MIG-1c"]}]
    nvml = SimpleNamespace(
        NVMLError=NotFound,
        NVML_DEVICE_MIG_ENABLE=1,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetMigMode=lambda h: (1, 1) if "mig" in h else _raise(NotFound()),
        nvmlDeviceGetMaxMigDeviceCount=lambda h: len(h["mig"]),
        nvmlDeviceGetMigDeviceHandleByIndex=lambda h, i: h["mig"][i] or _raise(NotFound()),
        nvmlDeviceGetUUID=lambda h: h["uuid"] if isinstance(h, dict) else h,
    )
    assert devices.host_devices(nvml) == ["GPU-0", "MIG-1a", "MIG-1c"]
    monkeypatch.setenv(devices.DEVICES_ENV, "2, 3")
    assert devices.host_devices(nvml) == ["2", "3"]


def _raise(error: Exception):
    raise error
