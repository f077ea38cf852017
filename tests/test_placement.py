"""Placement: cgroup paths of the container runtimes, CFS throttling, the kubelet pod-resources API
over a real gRPC server on a unix socket, and the resolver that joins them with NVML's processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.placement.podresources import (
    PodDevice,
    PodResourcesClient,
    PodResourcesUnavailable,
    gpu_to_pods,
    message_classes,
)
from collector.placement.procfs import (
    CgroupCpuThrottling,
    ProcessCgroup,
    parse_cgroup_file,
    read_cgroup_cpu_throttling,
    read_process_cgroup,
)
from collector.placement.resolver import PlacementResolver
from collector.records import GpuIdentity, GpuProcess, GpuSample
from tests.kubelet_standin import KubeletPodResourcesServer

CID = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00998877665544332211"
CID2 = "9a8b7c6d5e4f30211203f4e5d6c7b8a9aabbccddeeff00112233445566778899"
POD_UID = "6b1c9e2a-0d4f-4e8a-9c3b-2a1d0e9f8c7b"
POD_UID_ = POD_UID.replace("-", "_")
STATIC_POD_UID = "5c5e6a3ef1c7ab3b4f3b1f6cd0f8b6e2"

# ---------------------------------------------------------------------------------------------------
# /proc/<pid>/cgroup

# what the runtimes write, whole files as the kernel prints them
DOCKER_V1 = f"""12:hugetlb:/docker/{CID}
11:memory:/docker/{CID}
10:cpuset:/docker/{CID}
9:pids:/docker/{CID}
4:cpu,cpuacct:/docker/{CID}
3:devices:/docker/{CID}
1:name=systemd:/docker/{CID}
0::/system.slice/containerd.service
"""
CONTAINERD_K8S_V2 = (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_}.slice/"
                     f"cri-containerd-{CID}.scope\n")
CRIO_K8S_V2 = f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID_}.slice/crio-{CID}.scope\n"
CRIO_CONMON_V2 = (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID_}.slice/"
                  f"crio-conmon-{CID}.scope\n")
PODMAN_V2 = f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n"
SYSTEMD_SERVICE_V2 = "0::/system.slice/vllm.service\n"


@pytest.mark.parametrize(("text", "container", "pod_uid", "path"), [
    pytest.param(DOCKER_V1, CID, None, f"/docker/{CID}", id="docker-v1"),
    pytest.param(f"4:cpu,cpuacct:/system.slice/docker-{CID}.scope\n0::/\n", CID, None,
                 f"/system.slice/docker-{CID}.scope", id="docker-v1-systemd-driver"),
    pytest.param(CONTAINERD_K8S_V2, CID, POD_UID, CONTAINERD_K8S_V2[3:-1], id="containerd-k8s-v2"),
    pytest.param(f"4:cpu,cpuacct:/kubepods/besteffort/pod{POD_UID}/{CID}\n", CID, POD_UID,
                 f"/kubepods/besteffort/pod{POD_UID}/{CID}", id="containerd-k8s-v1-cgroupfs"),
    pytest.param(f"0::/kubepods/pod{POD_UID}/{CID}\n", CID, POD_UID, None, id="guaranteed-cgroupfs-v2"),
    pytest.param(CRIO_K8S_V2, CID, POD_UID, None, id="crio"),
    pytest.param(CRIO_CONMON_V2, None, POD_UID, None, id="crio-conmon-is-not-the-container"),
    pytest.param(f"0::/machine.slice/libpod-conmon-{CID}.scope\n", None, None, None, id="podman-conmon"),
    pytest.param(PODMAN_V2, CID, None, PODMAN_V2[3:-1], id="podman-rootless"),
    pytest.param(SYSTEMD_SERVICE_V2, None, None, "/system.slice/vllm.service", id="bare-metal-service"),
    pytest.param(f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{STATIC_POD_UID}.slice/"
                 f"cri-containerd-{CID}.scope\n", CID, STATIC_POD_UID, None, id="static-pod-uid"),
    # kind / docker-in-docker: the pod's container nests inside the node's container; the innermost wins
    pytest.param(f"0::/system.slice/docker-{CID2}.scope/kubelet.slice/kubelet-kubepods.slice/"
                 f"kubelet-kubepods-pod{POD_UID_}.slice/cri-containerd-{CID}.scope\n", CID, POD_UID, None,
                 id="kind-nested"),
    pytest.param(f"0::/docker/{CID2}/docker/{CID}\n", CID, None, None, id="docker-in-docker"),
    # v2 marks a removed cgroup still listed for an exiting task
    pytest.param(f"0::/system.slice/docker-{CID}.scope (deleted)\n", CID, None,
                 f"/system.slice/docker-{CID}.scope", id="deleted"),
    # not 64 hex digits: not a container id
    pytest.param(f"0::/docker/{CID}0\n0::/docker/{CID[:-1]}\n", None, None, None, id="wrong-length"),
    pytest.param("", None, None, None, id="empty"),
])
def test_container_and_pod_from_cgroup(text: str, container: str | None, pod_uid: str | None,
                                       path: str | None) -> None:
    cg = parse_cgroup_file(42, text)
    assert cg.container_id == container
    assert cg.pod_uid == pod_uid
    if path is not None:
        assert cg.cgroup_path == path


def _fake_proc(root: Path, files: dict[int, str]) -> Path:
    for pid, text in files.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(text)
    return root


def test_read_process_cgroup_from_a_fake_proc(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path / "proc", {101: DOCKER_V1, 102: CONTAINERD_K8S_V2, 103: CRIO_K8S_V2,
                                          104: PODMAN_V2, 105: SYSTEMD_SERVICE_V2, 106: CRIO_CONMON_V2})
    (proc / "107").mkdir()  # the process exited between the directory listing and the read
    got = {pid: read_process_cgroup(pid, proc) for pid in range(101, 109)}
    assert got[101] == ProcessCgroup(101, CID, f"/docker/{CID}", None)
    assert got[102] == ProcessCgroup(102, CID, CONTAINERD_K8S_V2[3:-1], POD_UID)
    assert got[103] is not None and (got[103].container_id, got[103].pod_uid) == (CID, POD_UID)
    assert got[104] is not None and got[104].container_id == CID
    assert got[105] == ProcessCgroup(105, None, "/system.slice/vllm.service", None)
    assert got[106] is not None and got[106].container_id is None
    assert got[107] is None and got[108] is None


def test_process_vanishing_mid_read_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = _fake_proc(tmp_path / "proc", {7: SYSTEMD_SERVICE_V2})

    def gone(self: Path, *args: Any, **kwargs: Any) -> str:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(Path, "read_text", gone)
    assert read_process_cgroup(7, proc) is None


def test_real_exited_and_zombie_processes_never_raise() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 5
    # a zombie until reaped: reading it may give its cgroup or nothing, but never raises
    while time.monotonic() < deadline:
        state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.01)
    zombie = read_process_cgroup(child.pid)
    assert zombie is None or zombie.pid == child.pid
    child.wait()
    assert read_process_cgroup(child.pid) is None


def test_real_proc_self() -> None:
    me = read_process_cgroup(os.getpid())
    assert me is not None and me.pid == os.getpid()
    assert me.cgroup_path is not None and me.cgroup_path.startswith("/")
    stats = read_cgroup_cpu_throttling(me)  # whatever this host's cgroup layout, an answer or None
    assert stats is None or (stats.nr_periods >= 0 and stats.throttled_s >= 0)


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sl-fuzz-"))
    (d / "proc" / "1").mkdir(parents=True)
    yield d
    shutil.rmtree(d)


_CGROUPISH = st.lists(st.one_of(
    st.sampled_from([DOCKER_V1, CONTAINERD_K8S_V2, CRIO_CONMON_V2, PODMAN_V2, ":", "::", "0::", "0::/", "\n",
                     "(deleted)", "pod", "crio-", "docker-", ".scope", ".slice", CID, POD_UID_, "/"]),
    st.text(max_size=40)), max_size=20).map("".join)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=2000), _CGROUPISH.map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_any_cgroup_file_content_is_survived(fuzz_dir: Path, content: bytes) -> None:
    (fuzz_dir / "proc" / "1" / "cgroup").write_bytes(content)
    cg = read_process_cgroup(1, fuzz_dir / "proc")
    assert cg is not None and cg.pid == 1
    assert cg.container_id is None or len(cg.container_id) == 64
    assert cg.pod_uid is None or len(cg.pod_uid) in (32, 36)
    read_cgroup_cpu_throttling(cg, fuzz_dir / "cgroup")  # arbitrary paths: never raises


# ---------------------------------------------------------------------------------------------------
# CFS throttling from cpu.stat

def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cfs_throttling_v2_and_v1(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path / "proc", {201: CONTAINERD_K8S_V2, 202: DOCKER_V1, 203: SYSTEMD_SERVICE_V2})
    v2_root = tmp_path / "v2"
    _write(v2_root / CONTAINERD_K8S_V2[4:-1] / "cpu.stat",
           "usage_usec 5000000\nuser_usec 4000000\nsystem_usec 1000000\nnr_periods 1200\nnr_throttled 300\n"
           "throttled_usec 2500000\nnr_bursts 0\nburst_usec 0\nmalformed line here\nnr_bursts x\n")
    # a systemd service without the cpu controller enabled: no periods, nothing to report
    _write(v2_root / "system.slice" / "vllm.service" / "cpu.stat", "usage_usec 10\nuser_usec 5\nsystem_usec 5\n")
    k8s = read_process_cgroup(201, proc)
    assert k8s is not None
    assert read_cgroup_cpu_throttling(k8s, v2_root) == CgroupCpuThrottling(1200, 300, 2.5, 5.0)
    service = read_process_cgroup(203, proc)
    assert service is not None and read_cgroup_cpu_throttling(service, v2_root) is None

    v1_root = tmp_path / "v1"
    _write(v1_root / "cpu,cpuacct" / "docker" / CID / "cpu.stat",
           "nr_periods 10\nnr_throttled 4\nthrottled_time 1500000000\nnr_bursts 0\nburst_time 0\n")
    _write(v1_root / "cpu,cpuacct" / "docker" / CID / "cpuacct.usage", "7000000000\n")
    docker = read_process_cgroup(202, proc)
    assert docker is not None
    assert read_cgroup_cpu_throttling(docker, v1_root) == CgroupCpuThrottling(10, 4, 1.5, 7.0)
    assert read_cgroup_cpu_throttling(ProcessCgroup(1, None, "/gone"), v2_root) is None
    assert read_cgroup_cpu_throttling(ProcessCgroup(1, None, None), v2_root) is None


def test_cfs_throttling_v1_with_cpu_and_cpuacct_mounted_apart(tmp_path: Path) -> None:
    _write(tmp_path / "cpu" / "docker" / CID / "cpu.stat", "nr_periods 3\nnr_throttled 1\nthrottled_time 2000\n")
    _write(tmp_path / "cpuacct" / "docker" / CID / "cpuacct.usage", "3000000000\n")
    got = read_cgroup_cpu_throttling(ProcessCgroup(1, CID, f"/docker/{CID}"), tmp_path)
    assert got == CgroupCpuThrottling(3, 1, 2e-6, 3.0)
    (tmp_path / "cpuacct" / "docker" / CID / "cpuacct.usage").write_text("garbage\n")
    got = read_cgroup_cpu_throttling(ProcessCgroup(1, CID, f"/docker/{CID}"), tmp_path)
    assert got is not None and got.usage_s is None


@pytest.mark.parametrize("content", [
    "nr_periods ²\nthrottled_usec 1\n",  # a digit to str.isdigit(), not to int()
    "nr_periods\nthrottled_usec\n", "nr_periods 1 2\n", "\x00\x00", "nr_periods 1e3\nthrottled_usec 0x10\n", "",
])
def test_malformed_cpu_stat_never_raises(tmp_path: Path, content: str) -> None:
    _write(tmp_path / "a" / "cpu.stat", content)
    assert read_cgroup_cpu_throttling(ProcessCgroup(1, None, "/a"), tmp_path) is None


def test_cpu_stat_vanishing_or_unreadable(tmp_path: Path) -> None:
    (tmp_path / "a" / "cpu.stat").mkdir(parents=True)  # EISDIR
    assert read_cgroup_cpu_throttling(ProcessCgroup(1, None, "/a"), tmp_path) is None
    assert read_cgroup_cpu_throttling(ProcessCgroup(1, None, "/../../etc"), tmp_path) is None


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=500))
def test_any_cpu_stat_content_is_survived(fuzz_dir: Path, content: bytes) -> None:
    _write(fuzz_dir / "cgroup" / "x" / "cpu.stat", "")
    (fuzz_dir / "cgroup" / "x" / "cpu.stat").write_bytes(content)
    got = read_cgroup_cpu_throttling(ProcessCgroup(1, None, "/x"), fuzz_dir / "cgroup")
    assert got is None or isinstance(got.throttled_s, float)


# ---------------------------------------------------------------------------------------------------
# kubelet pod-resources API, over a real gRPC server on a unix socket

GPU_A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
GPU_B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
GPU_C = "GPU-cccccccc-0000-0000-0000-000000000000"
MIG_1 = "MIG-11111111-2222-3333-4444-555555555555"
PODS: list[dict[str, Any]] = [
    {"name": "vllm-70b-0", "namespace": "serving", "containers": [
        # tensor parallel: two GPUs in one container, beside a NIC and exclusive CPUs
        {"name": "engine", "cpu_ids": [2, 3, 4, 5],
         "devices": [{"resource_name": "nvidia.com/gpu", "device_ids": [GPU_A, GPU_B], "numa_nodes": [0]},
                     {"resource_name": "example.com/rdma-nic", "device_ids": ["mlx5_0"]}]},
        {"name": "sidecar", "devices": []}]},
    {"name": "embedder-7f9c", "namespace": "serving", "containers": [
        {"name": "init-cache", "devices": []},
        {"name": "embed", "devices": [{"resource_name": "nvidia.com/mig-1g.10gb", "device_ids": [MIG_1]}]}]},
    {"name": "trainer-2", "namespace": "research", "containers": [
        {"name": "worker", "devices": [{"resource_name": "nvidia.com/gpu", "device_ids": [GPU_C]}]}]},
    {"name": "cpu-only", "namespace": "default", "containers": [
        {"name": "c", "devices": [{"resource_name": "intel.com/qat", "device_ids": ["qat0"]}]}]},
]


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    # sun_path holds ~108 bytes: use tmp_path when it is short enough, a short /tmp directory otherwise
    if len(str(tmp_path / "kubelet.sock")) < 100:
        yield tmp_path / "kubelet.sock"
        return
    short = Path(tempfile.mkdtemp(prefix="slk-", dir="/tmp"))
    yield short / "kubelet.sock"
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def kubelet(sock_path: Path) -> Iterator[KubeletPodResourcesServer]:
    with KubeletPodResourcesServer(sock_path, PODS) as server:
        yield server


def test_pod_resources_over_a_real_unix_socket(kubelet: KubeletPodResourcesServer) -> None:
    with PodResourcesClient(kubelet.socket_path) as client:
        assert client.available()
        devices = client.list_gpu_devices()
    assert devices == [
        PodDevice("vllm-70b-0", "serving", "engine", "nvidia.com/gpu", GPU_A),
        PodDevice("vllm-70b-0", "serving", "engine", "nvidia.com/gpu", GPU_B),
        PodDevice("embedder-7f9c", "serving", "embed", "nvidia.com/mig-1g.10gb", MIG_1),
        PodDevice("trainer-2", "research", "worker", "nvidia.com/gpu", GPU_C),
    ]  # the NIC and the QAT device are not GPUs; containers without devices give nothing
    by_gpu = gpu_to_pods(devices)
    assert set(by_gpu) == {GPU_A, GPU_B, MIG_1, GPU_C}
    assert by_gpu[GPU_A][0].container == by_gpu[GPU_B][0].container == "engine"
    assert kubelet.calls == 1


def test_resource_prefixes_choose_what_is_listed(kubelet: KubeletPodResourcesServer) -> None:
    with PodResourcesClient(kubelet.socket_path) as client:
        assert [d.device_id for d in client.list_gpu_devices(("nvidia.com/gpu",))] == [GPU_A, GPU_B, GPU_C]
        assert [d.device_id for d in client.list_gpu_devices(("example.com/", "intel.com/"))] == ["mlx5_0", "qat0"]
        assert client.list_gpu_devices(()) == []


def test_set_pods_changes_the_answer_and_errors_are_unavailable(kubelet: KubeletPodResourcesServer) -> None:
    with PodResourcesClient(kubelet.socket_path) as client:
        assert len(client.list_gpu_devices()) == 4
        kubelet.set_pods([{"name": "new", "namespace": "ns", "containers": [
            {"name": "c", "devices": [{"resource_name": "nvidia.com/gpu", "device_ids": [GPU_B]}]}]}])
        assert client.list_gpu_devices() == [PodDevice("new", "ns", "c", "nvidia.com/gpu", GPU_B)]
        kubelet.set_pods([])
        assert client.list_gpu_devices() == []
        kubelet.fail_with(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(PodResourcesUnavailable, match="UNAVAILABLE: kubelet stand-in told to fail"):
            client.list_gpu_devices()
        kubelet.fail_with(grpc.StatusCode.PERMISSION_DENIED)
        with pytest.raises(PodResourcesUnavailable, match="PERMISSION_DENIED"):
            client.list_gpu_devices()
        kubelet.fail_with(None)
        assert client.list_gpu_devices() == []  # the same client recovers
    assert kubelet.calls == 6


def test_deadline_is_unavailable(kubelet: KubeletPodResourcesServer) -> None:
    kubelet.set_delay(3.0)
    with PodResourcesClient(kubelet.socket_path, timeout_s=0.2) as client:
        start = time.monotonic()
        with pytest.raises(PodResourcesUnavailable, match="DEADLINE_EXCEEDED"):
            client.list_gpu_devices()
        assert time.monotonic() - start < 2.0


def test_missing_socket_fails_fast(tmp_path: Path) -> None:
    client = PodResourcesClient(tmp_path / "no.sock", timeout_s=1.0)
    assert not client.available()
    start = time.monotonic()
    with pytest.raises(PodResourcesUnavailable, match="no kubelet pod-resources socket"):
        client.list_gpu_devices()
    assert time.monotonic() - start < 2.0


def test_stale_socket_with_no_listener_fails_fast(sock_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock_path))  # the file of a kubelet that died: it exists, nobody accepts on it
    s.close()
    with PodResourcesClient(sock_path, timeout_s=1.0) as client:
        assert client.available()
        start = time.monotonic()
        with pytest.raises(PodResourcesUnavailable, match="UNAVAILABLE"):
            client.list_gpu_devices()
        assert time.monotonic() - start < 2.0


def test_kubelet_restart_is_picked_up_at_once(sock_path: Path) -> None:
    with PodResourcesClient(sock_path, timeout_s=1.0) as client:
        with KubeletPodResourcesServer(sock_path, PODS):
            assert len(client.list_gpu_devices()) == 4
        # the kubelet crashed and left its socket file: every call is refused while gRPC's reconnect
        # backoff grows; the client must not carry that backoff over to the restarted kubelet
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(sock_path))
        stale.close()
        down_until = time.monotonic() + 1.5
        while time.monotonic() < down_until:
            with pytest.raises(PodResourcesUnavailable, match="UNAVAILABLE"):
                client.list_gpu_devices()
            time.sleep(0.05)
        with KubeletPodResourcesServer(sock_path, PODS[2:]) as restarted:
            start = time.monotonic()
            assert [d.pod for d in client.list_gpu_devices()] == ["trainer-2"]  # the first call after
            assert time.monotonic() - start < 1.0
            assert restarted.calls == 1


def test_wire_format_matches_the_kubelet_field_numbers() -> None:
    cls = message_classes()

    def varint(n: int) -> bytes:
        out = bytearray()
        while n >= 0x80:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes([*out, n])

    def ld(field: int, payload: bytes) -> bytes:  # a length-delimited field (wire type 2)
        return varint(field << 3 | 2) + varint(len(payload)) + payload

    # NUMANode { ID(1) = 1 }, TopologyInfo { nodes(1) }
    topology = ld(1, b"\x08\x01")
    device = ld(1, b"nvidia.com/gpu") + ld(2, GPU_A.encode()) + ld(2, GPU_B.encode()) + ld(3, topology)
    container = ld(1, b"engine") + ld(2, device)
    pod = ld(1, b"vllm-0") + ld(2, b"serving") + ld(3, container)
    wire = ld(1, pod)

    # our classes serialize the kubelet's bytes exactly ...
    msg = cls["ListPodResourcesResponse"]()
    p = msg.pod_resources.add(name="vllm-0", namespace="serving")
    d = p.containers.add(name="engine").devices.add(resource_name="nvidia.com/gpu", device_ids=[GPU_A, GPU_B])
    d.topology.nodes.add(ID=1)
    assert msg.SerializeToString() == wire
    assert cls["ListPodResourcesRequest"]().SerializeToString() == b""

    # ... and parse them field for field, tolerating what a newer kubelet adds: ContainerResources'
    # cpu_ids(3, packed), memory(4) and dynamic_resources(5), and a field number unknown to anyone
    newer_container = container + ld(3, b"\x02\x03") + ld(4, ld(1, b"hugepages-1Gi")) + ld(5, ld(1, b"claim"))
    newer_pod = ld(1, b"vllm-0") + ld(2, b"serving") + ld(3, newer_container) + ld(15, b"future")
    parsed = cls["ListPodResourcesResponse"].FromString(ld(1, newer_pod))
    pr = parsed.pod_resources[0]
    assert (pr.name, pr.namespace, pr.containers[0].name) == ("vllm-0", "serving", "engine")
    dev = pr.containers[0].devices[0]
    assert (dev.resource_name, list(dev.device_ids), dev.topology.nodes[0].ID) == (
        "nvidia.com/gpu", [GPU_A, GPU_B], 1)
    assert list(pr.containers[0].cpu_ids) == [2, 3]

    # the names and numbers of the declared schema, as the kubelet's api.proto has them
    fields = {(m, f.name): f.number for m in ("ListPodResourcesResponse", "PodResources", "ContainerResources",
                                               "ContainerDevices", "TopologyInfo", "NUMANode")
              for f in cls[m].DESCRIPTOR.fields}
    assert fields == {
        ("ListPodResourcesResponse", "pod_resources"): 1,
        ("PodResources", "name"): 1, ("PodResources", "namespace"): 2, ("PodResources", "containers"): 3,
        ("ContainerResources", "name"): 1, ("ContainerResources", "devices"): 2, ("ContainerResources", "cpu_ids"): 3,
        ("ContainerDevices", "resource_name"): 1, ("ContainerDevices", "device_ids"): 2,
        ("ContainerDevices", "topology"): 3, ("TopologyInfo", "nodes"): 1, ("NUMANode", "ID"): 1,
    }
    assert cls["ListPodResourcesResponse"].DESCRIPTOR.full_name == "v1.ListPodResourcesResponse"


def test_gpu_to_pods_keys_by_device_id() -> None:
    a = PodDevice("p", "n", "c", "nvidia.com/gpu", GPU_A)
    b = PodDevice("q", "n", "c", "nvidia.com/gpu", GPU_B)
    a2 = PodDevice("p2", "n", "c", "nvidia.com/gpu", GPU_A)  # shared (time-slicing): both kept, in order
    assert gpu_to_pods([a, b, a2]) == {GPU_A: [a, a2], GPU_B: [b]}
    assert gpu_to_pods([]) == {}


# ---------------------------------------------------------------------------------------------------
# the resolver: NVML processes + /proc + pod-resources

def test_resolver_joins_processes_containers_and_pods(kubelet: KubeletPodResourcesServer, tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path / "proc", {
        4120: f"0::/kubepods.slice/kubepods-pod{POD_UID_}.slice/cri-containerd-{CID}.scope\n"})
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
