"""A real gRPC server of our own that serves the kubelet pod-resources API (v1.PodResourcesLister/List)
on a unix socket, as the kubelet does, for tests of the agent's placement."""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from collector.placement.podresources import message_classes

Pods = list[dict[str, Any]]


class KubeletPodResourcesServer:
    """``pods``: ``[{"name", "namespace", "containers": [{"name", "devices": [{"resource_name",
    "device_ids": [...]}]}]}]``."""

    def __init__(self, socket_path: Path, pods: Pods) -> None:
        self.socket_path = socket_path
        self._pods = pods
        self._fail: grpc.StatusCode | None = None
        self._lock = threading.Lock()
        self.calls = 0
        self._classes = message_classes()
        self._server: Any = None

    def set_pods(self, pods: Pods) -> None:
        with self._lock:
            self._pods = pods

    def fail_with(self, code: grpc.StatusCode | None) -> None:
        with self._lock:
            self._fail = code

    def _list(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.calls += 1
            fail, pods = self._fail, self._pods
        if fail is not None:
            context.abort(fail, "kubelet stand-in told to fail")
        response = self._classes["ListPodResourcesResponse"]()
        for pod in pods:
            p = response.pod_resources.add(name=pod["name"], namespace=pod["namespace"])
            for container in pod.get("containers", []):
                c = p.containers.add(name=container["name"])
                for dev in container.get("devices", []):
                    c.devices.add(resource_name=dev["resource_name"], device_ids=dev["device_ids"])
        return response

    def start(self) -> KubeletPodResourcesServer:
        handler = grpc.unary_unary_rpc_method_handler(
            self._list,
            request_deserializer=self._classes["ListPodResourcesRequest"].FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("v1.PodResourcesLister", {"List": handler}),))
        self._server.add_insecure_port(f"unix:{self.socket_path}")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def __enter__(self) -> KubeletPodResourcesServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
