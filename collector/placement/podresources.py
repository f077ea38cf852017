"""Client of the kubelet pod-resources API (v1): which pod and container each GPU was allocated to.

The kubelet serves gRPC ``v1.PodResourcesLister/List`` on a unix socket. The message types are
declared here from their field numbers (the wire contract) and built at import time through a private
descriptor pool, so there is no generated code to keep in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
_METHOD = "/v1.PodResourcesLister/List"
# a node with many pods can answer more than gRPC's default 4 MiB receive limit; the kubelet's own client
# of this API reads up to 16 MiB
_MAX_RESPONSE_BYTES = 16 * 1024 * 1024

_F = descriptor_pb2.FieldDescriptorProto


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="stacklens/podresources_v1.proto", package="v1", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str | None]) -> None:
        m = fd.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    rep, opt = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
    message("ListPodResourcesRequest")
    message("ListPodResourcesResponse", ("pod_resources", 1, _F.TYPE_MESSAGE, rep, ".v1.PodResources"))
    message("PodResources", ("name", 1, _F.TYPE_STRING, opt, None), ("namespace", 2, _F.TYPE_STRING, opt, None),
            ("containers", 3, _F.TYPE_MESSAGE, rep, ".v1.ContainerResources"))
    message("ContainerResources", ("name", 1, _F.TYPE_STRING, opt, None),
            ("devices", 2, _F.TYPE_MESSAGE, rep, ".v1.ContainerDevices"),
            ("cpu_ids", 3, _F.TYPE_INT64, rep, None))
    message("ContainerDevices", ("resource_name", 1, _F.TYPE_STRING, opt, None),
            ("device_ids", 2, _F.TYPE_STRING, rep, None),
            ("topology", 3, _F.TYPE_MESSAGE, opt, ".v1.TopologyInfo"))
    message("TopologyInfo", ("nodes", 1, _F.TYPE_MESSAGE, rep, ".v1.NUMANode"))
    message("NUMANode", ("ID", 1, _F.TYPE_INT64, opt, None))
    return fd


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())
_CLASSES: dict[str, Any] = {
    name: message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"v1.{name}"))
    for name in ("ListPodResourcesRequest", "ListPodResourcesResponse", "PodResources", "ContainerResources",
                 "ContainerDevices", "TopologyInfo", "NUMANode")
}


def message_classes() -> dict[str, Any]:
    """The message classes by name (a test server of the API reuses them)."""
    return dict(_CLASSES)


class PodResourcesUnavailable(Exception):
    """The kubelet pod-resources API could not be asked (no socket, connection, deadline, error)."""


@dataclass(frozen=True, slots=True)
class PodDevice:
    pod: str
    namespace: str
    container: str
    resource_name: str
    device_id: str


class PodResourcesClient:
    """Asks the kubelet which pod and container each device was allocated to.

    The channel is made on the first call. After any failed call it is dropped, so that the next call
    dials afresh rather than waiting out gRPC's reconnect backoff once a restarted kubelet is back."""

    def __init__(self, socket_path: Path = DEFAULT_SOCKET, timeout_s: float = 1.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._channel: Any = None
        self._list: Any = None

    def available(self) -> bool:
        """Whether the socket exists (the kubelet may still refuse or fail the call)."""
        return self.socket_path.exists()

    def _connect(self) -> Any:
        if self._list is None:
            import grpc

            self._channel = grpc.insecure_channel(
                f"unix://{self.socket_path.absolute()}",
                options=[("grpc.max_receive_message_length", _MAX_RESPONSE_BYTES)],
            )
            self._list = self._channel.unary_unary(
                _METHOD,
                request_serializer=_serialize,
                response_deserializer=_CLASSES["ListPodResourcesResponse"].FromString,
            )
        return self._list

    def list_gpu_devices(self, resource_prefixes: tuple[str, ...] = ("nvidia.com/",)) -> list[PodDevice]:
        """One :class:`PodDevice` per allocated device whose resource name starts with a prefix.

        Raises :class:`PodResourcesUnavailable` for an absent socket, a refused connection, a deadline
        (``timeout_s``) or any other gRPC error."""
        if not self.available():
            raise PodResourcesUnavailable(f"no kubelet pod-resources socket at {self.socket_path}")
        import grpc

        try:
            response = self._connect()(_CLASSES["ListPodResourcesRequest"](), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            self.close()
            raise PodResourcesUnavailable(
                f"kubelet pod-resources List on {self.socket_path} failed: {_describe(exc)}") from None
        out: list[PodDevice] = []
        for pod in response.pod_resources:
            for container in pod.containers:
                for dev in container.devices:
                    if dev.resource_name.startswith(resource_prefixes):
                        out.extend(PodDevice(pod.name, pod.namespace, container.name, dev.resource_name, d)
                                   for d in dev.device_ids)
        return out

    def close(self) -> None:
        channel, self._channel, self._list = self._channel, None, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> PodResourcesClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _describe(exc: Exception) -> str:
    """``CODE: details`` of a failed call (a grpc.RpcError raised by a call is also a grpc.Call)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    try:
        name = code().name if callable(code) and code() is not None else "UNKNOWN"
        text = details() if callable(details) else None
    except Exception:  # a broken error object must not hide the failure itself
        name, text = "UNKNOWN", None
    return f"{name}: {text}" if text else name


def gpu_to_pods(devices: list[PodDevice]) -> dict[str, list[PodDevice]]:
    """Devices keyed by device id (the GPU UUID for nvidia.com/gpu)."""
    out: dict[str, list[PodDevice]] = {}
    for d in devices:
        out.setdefault(d.device_id, []).append(d)
    return out
