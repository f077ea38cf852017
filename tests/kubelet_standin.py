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
    """Serves ``pods``: ``[{"name", "namespace", "containers": [{"name", "cpu_ids"?: [...], "devices":
    [{"resource_name", "device_ids": [...], "numa_nodes"?: [...]}]}]}]``.

    ``set_pods`` changes the answer, ``fail_with`` makes List fail with a status code (None: answer
    again), ``set_delay`` makes List answer late (to run a client into its deadline); ``calls`` counts
    the List calls received."""

    def __init__(self, socket_path: Path, pods: Pods) -> None:
        self.socket_path = socket_path
        self._pods = pods
        self._fail: grpc.StatusCode | None = None
        self._delay_s = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.calls = 0
        self._classes = message_classes()
        self._server: Any = None

    def set_pods(self, pods: Pods) -> None:
        with self._lock:
            self._pods = pods

    def fail_with(self, code: grpc.StatusCode | None) -> None:
        with self._lock:
            self._fail = code

    def set_delay(self, seconds: float) -> None:
        with self._lock:
            self._delay_s = seconds

    def _list(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.calls += 1
            fail, pods, delay_s = self._fail, self._pods, self._delay_s
        if delay_s > 0:
            self._stopping.wait(delay_s)  # cut short when the server stops
        if fail is not None:
            context.abort(fail, "kubelet stand-in told to fail")
        response = self._classes["ListPodResourcesResponse"]()
        for pod in pods:
            p = response.pod_resources.add(name=pod["name"], namespace=pod["namespace"])
            for container in pod.get("containers", []):
                c = p.containers.add(name=container["name"], cpu_ids=container.get("cpu_ids", []))
                for dev in container.get("devices", []):
                    d = c.devices.add(resource_name=dev["resource_name"], device_ids=dev["device_ids"])
                    for numa in dev.get("numa_nodes", []):
                        d.topology.nodes.add(ID=numa)
        return response

    def start(self) -> KubeletPodResourcesServer:
        handler = grpc.unary_unary_rpc_method_handler(
            self._list,
            request_deserializer=self._classes["ListPodResourcesRequest"].FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )
        self._stopping.clear()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("v1.PodResourcesLister", {"List": handler}),))
        self._server.add_insecure_port("unix:" + str(self.socket_path))
        self._server.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> KubeletPodResourcesServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
