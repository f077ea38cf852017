"""Placement: cgroup paths of the container runtimes, CFS throttling, the kubelet pod-resources API
over a real gRPC server on a unix socket, and the resolver that joins them with NVML's processes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.placement.podresources import (
    PodResourcesClient,
    PodResourcesUnavailable,
    gpu_to_pods,
    message_classes,
)
from collector.placement.procfs import (
    ProcessCgroup,
    parse_cgroup_file,
    read_cgroup_cpu_throttling,
    read_process_cgroup,
)
from collector.placement.resolver import PlacementResolver
from collector.records import GpuIdentity, GpuProcess, GpuSample
from tests.kubelet_standin import KubeletPodResourcesServer

CID = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00998877665544332211"
POD_UID = "6b1c9e2a-0d4f-4e8a-9c3b-2a1d0e9f8c7b"


@pytest.mark.parametrize(("text", "container", "pod_uid", "path"), [
    # docker, cgroup v1
    (f"12:cpu,cpuacct:/docker/{CID}\n11:memory:/docker/{CID}\n", CID, None, f"/docker/{CID}"),
    # containerd under Kubernetes, cgroup v2 with systemd slices
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/"
     f"cri-containerd-{CID}.scope\n", CID, POD_UID, None),
    # cgroupfs driver, v1
    (f"4:cpu,cpuacct:/kubepods/besteffort/pod{POD_UID}/{CID}\n", CID, POD_UID,
     f"/kubepods/besteffort/pod{POD_UID}/{CID}"),
    # CRI-O: the container, not its conmon monitor
    (f"0::/kubepods.slice/crio-conmon-{'a' * 64}.scope\n", None, None, None),
    (f"0::/kubepods.slice/crio-{CID}.scope\n", CID, None, None),
    # podman
    (f"0::/machine.slice/libpod-{CID}.scope/container\n", CID, None, None),
    # a bare-metal systemd service: no container
    ("0::/system.slice/vllm.service\n", None, None, "/system.slice/vllm.service"),
])
def test_container_and_pod_from_cgroup(text: str, container: str | None, pod_uid: str | None,
                                       path: str | None) -> None:
    cg = parse_cgroup_file(42, text)
    assert cg.container_id == container
    assert cg.pod_uid == pod_uid
    if path is not None:
        assert cg.cgroup_path == path


def test_vanished_process_is_none_and_self_is_readable(tmp_path: Path) -> None:
    assert read_process_cgroup(999_999, tmp_path) is None
    me = read_process_cgroup(os.getpid())
    assert me is not None and me.pid == os.getpid()


@given(st.text(max_size=2000))
def test_any_cgroup_file_content_is_survived(text: str) -> None:
    cg = parse_cgroup_file(1, text)
    assert cg.container_id is None or len(cg.container_id) == 64


def test_cfs_throttling_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2" / "kubepods.slice" / "pod.slice"
    v2.mkdir(parents=True)
    (v2 / "cpu.stat").write_text("usage_usec 5000000\nuser_usec 4000000\nnr_periods 1200\nnr_throttled 300\n"
                                 "throttled_usec 2500000\nmalformed line here\n")
    got = read_cgroup_cpu_throttling(ProcessCgroup(1, None, "/kubepods.slice/pod.slice"), tmp_path / "v2")
    assert got is not None
    assert (got.nr_periods, got.nr_throttled, got.throttled_s, got.usage_s) == (1200, 300, 2.5, 5.0)
    v1 = tmp_path / "v1" / "cpu,cpuacct" / "docker" / CID
    v1.mkdir(parents=True)
    (v1 / "cpu.stat").write_text("nr_periods 10\nnr_throttled 4\nthrottled_time 1500000000\n")
    (v1 / "cpuacct.usage").write_text("7000000000\n")
    got = read_cgroup_cpu_throttling(ProcessCgroup(1, CID, f"/docker/{CID}"), tmp_path / "v1")
    assert got is not None
    assert (got.nr_periods, got.nr_throttled, got.throttled_s, got.usage_s) == (10, 4, 1.5, 7.0)
    assert read_cgroup_cpu_throttling(ProcessCgroup(1, None, "/gone"), tmp_path / "v2") is None


GPU_A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
GPU_B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
PODS: list[dict[str, Any]] = [
    {"name": "vllm-70b-0", "namespace": "serving", "containers": [
        {"name": "engine", "devices": [{"resource_name": "nvidia.com/gpu", "device_ids": [GPU_A, GPU_B]},
                                       {"resource_name": "example.com/nic", "device_ids": ["eth9"]}]},
        {"name": "sidecar", "devices": []}]},
    {"name": "cpu-only", "namespace": "default", "containers": [{"name": "c", "devices": []}]},
]


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[KubeletPodResourcesServer]:
    # unix socket paths are limited to ~100 bytes: keep it short
    sock = Path(f"/tmp/sl-kubelet-{os.getpid()}-{time.monotonic_ns()}.sock")
    server = KubeletPodResourcesServer(sock, PODS).start()
    yield server
    server.stop()
    sock.unlink(missing_ok=True)


def test_pod_resources_over_a_real_unix_socket(kubelet: KubeletPodResourcesServer) -> None:
    with PodResourcesClient(kubelet.socket_path) as client:
        devices = client.list_gpu_devices()
        assert [(d.pod, d.namespace, d.container, d.device_id) for d in devices] == [
            ("vllm-70b-0", "serving", "engine", GPU_A), ("vllm-70b-0", "serving", "engine", GPU_B)]
        by_gpu = gpu_to_pods(devices)
        assert by_gpu[GPU_B][0].pod == "vllm-70b-0"  # tensor parallel: both GPUs in one container
        kubelet.set_pods([])
        assert client.list_gpu_devices() == []
        kubelet.fail_with(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(PodResourcesUnavailable, match="UNAVAILABLE"):
            client.list_gpu_devices()
    assert kubelet.calls == 3


def test_missing_socket_fails_fast(tmp_path: Path) -> None:
    client = PodResourcesClient(tmp_path / "no.sock", timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(PodResourcesUnavailable, match="no kubelet"):
        client.list_gpu_devices()
    assert time.monotonic() - start < 2.0


def test_wire_format_matches_the_kubelet_field_numbers() -> None:
    cls = message_classes()
    # hand-encoded: pod_resources(1) { name(1)="p", namespace(2)="n", containers(3) { name(1)="c",
    # devices(2) { resource_name(1)="r", device_ids(2)="d" } } }
    dev = b"\x0a\x01r\x12\x01d"
    container = b"\x0a\x01c\x12" + bytes([len(dev)]) + dev
    pod = b"\x0a\x01p\x12\x01n\x1a" + bytes([len(container)]) + container
    msg = cls["ListPodResourcesResponse"].FromString(b"\x0a" + bytes([len(pod)]) + pod)
    p = msg.pod_resources[0]
    assert (p.name, p.namespace, p.containers[0].name) == ("p", "n", "c")
    assert (p.containers[0].devices[0].resource_name, list(p.containers[0].devices[0].device_ids)) == ("r", ["d"])


def test_resolver_joins_processes_containers_and_pods(kubelet: KubeletPodResourcesServer, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "4120").mkdir(parents=True)
    (proc / "4120" / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n")
    samples = [
        GpuSample(GpuIdentity(0, GPU_A, "H100", "0"), 1, (), (GpuProcess(4120, 1 << 30, "compute"),
                                                              GpuProcess(5555, None, "compute"))),
        GpuSample(GpuIdentity(1, GPU_B, "H100", "1"), 1, (), ()),
    ]
    resolver = PlacementResolver(proc, PodResourcesClient(kubelet.socket_path))
    placements = resolver.resolve(samples, 1000)
    first = placements[0]
    assert (first.pid, first.container_id, first.pod_uid, first.pod, first.namespace, first.container) == (
        4120, CID, POD_UID, "vllm-70b-0", "serving", "engine")
    assert placements[1].pid == 5555 and placements[1].container_id is None  # vanished: no container, no crash
    idle = placements[2]
    assert (idle.gpu_uuid, idle.pid, idle.pod) == (GPU_B, 0, "vllm-70b-0")  # allocated, no process yet
    kubelet.fail_with(grpc.StatusCode.UNAVAILABLE)
    resolver_after = PlacementResolver(proc, PodResourcesClient(kubelet.socket_path))
    assert resolver_after.resolve(samples, 2000)[0].pod is None  # kubelet down: placement without pod names
