from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SetLinkStateRequest(_message.Message):
    __slots__ = ("link", "up")
    LINK_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    link: str
    up: bool
    def __init__(self, link: _Optional[str] = ..., up: _Optional[bool] = ...) -> None: ...

class SetLinkLatencyRequest(_message.Message):
    __slots__ = ("link", "added_latency_us")
    LINK_FIELD_NUMBER: _ClassVar[int]
    ADDED_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    link: str
    added_latency_us: float
    def __init__(self, link: _Optional[str] = ..., added_latency_us: _Optional[float] = ...) -> None: ...

class SetLinkBandwidthRequest(_message.Message):
    __slots__ = ("link", "factor")
    LINK_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    link: str
    factor: float
    def __init__(self, link: _Optional[str] = ..., factor: _Optional[float] = ...) -> None: ...

class PartitionRequest(_message.Message):
    __slots__ = ("npus_a", "npus_b")
    NPUS_A_FIELD_NUMBER: _ClassVar[int]
    NPUS_B_FIELD_NUMBER: _ClassVar[int]
    npus_a: _containers.RepeatedScalarFieldContainer[int]
    npus_b: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, npus_a: _Optional[_Iterable[int]] = ..., npus_b: _Optional[_Iterable[int]] = ...) -> None: ...

class ClearFaultsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealPartitionRequest(_message.Message):
    __slots__ = ("partition_id",)
    PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    partition_id: str
    def __init__(self, partition_id: _Optional[str] = ...) -> None: ...

class FaultAck(_message.Message):
    __slots__ = ("epoch", "active_faults", "partition_id")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FAULTS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    active_faults: int
    partition_id: str
    def __init__(self, epoch: _Optional[str] = ..., active_faults: _Optional[int] = ..., partition_id: _Optional[str] = ...) -> None: ...

class GetTelemetryRequest(_message.Message):
    __slots__ = ("all_links",)
    ALL_LINKS_FIELD_NUMBER: _ClassVar[int]
    all_links: bool
    def __init__(self, all_links: _Optional[bool] = ...) -> None: ...

class LinkStats(_message.Message):
    __slots__ = ("name", "plane", "bandwidth_gbps", "latency_us", "up", "added_latency_us", "bandwidth_factor", "bytes", "transfers", "refusals", "busy_s", "utilization")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PLANE_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    ADDED_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_FACTOR_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    plane: str
    bandwidth_gbps: float
    latency_us: float
    up: bool
    added_latency_us: float
    bandwidth_factor: float
    bytes: int
    transfers: int
    refusals: int
    busy_s: float
    utilization: float
    def __init__(self, name: _Optional[str] = ..., plane: _Optional[str] = ..., bandwidth_gbps: _Optional[float] = ..., latency_us: _Optional[float] = ..., up: _Optional[bool] = ..., added_latency_us: _Optional[float] = ..., bandwidth_factor: _Optional[float] = ..., bytes: _Optional[int] = ..., transfers: _Optional[int] = ..., refusals: _Optional[int] = ..., busy_s: _Optional[float] = ..., utilization: _Optional[float] = ...) -> None: ...

class PartitionInfo(_message.Message):
    __slots__ = ("id", "npus_a", "npus_b")
    ID_FIELD_NUMBER: _ClassVar[int]
    NPUS_A_FIELD_NUMBER: _ClassVar[int]
    NPUS_B_FIELD_NUMBER: _ClassVar[int]
    id: str
    npus_a: _containers.RepeatedScalarFieldContainer[int]
    npus_b: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[str] = ..., npus_a: _Optional[_Iterable[int]] = ..., npus_b: _Optional[_Iterable[int]] = ...) -> None: ...

class HostStats(_message.Message):
    __slots__ = ("keeps_up", "service_mean_s", "service_max_s", "loop_lag_max_s", "min_emulated_latency_s", "client_waits", "client_late_mean_s", "client_late_max_s", "note")
    KEEPS_UP_FIELD_NUMBER: _ClassVar[int]
    SERVICE_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    SERVICE_MAX_S_FIELD_NUMBER: _ClassVar[int]
    LOOP_LAG_MAX_S_FIELD_NUMBER: _ClassVar[int]
    MIN_EMULATED_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    CLIENT_WAITS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LATE_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LATE_MAX_S_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    keeps_up: bool
    service_mean_s: float
    service_max_s: float
    loop_lag_max_s: float
    min_emulated_latency_s: float
    client_waits: int
    client_late_mean_s: float
    client_late_max_s: float
    note: str
    def __init__(self, keeps_up: _Optional[bool] = ..., service_mean_s: _Optional[float] = ..., service_max_s: _Optional[float] = ..., loop_lag_max_s: _Optional[float] = ..., min_emulated_latency_s: _Optional[float] = ..., client_waits: _Optional[int] = ..., client_late_mean_s: _Optional[float] = ..., client_late_max_s: _Optional[float] = ..., note: _Optional[str] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("epoch", "time_scale", "uptime_s", "servers", "npus_per_server", "registered_clients", "requests", "grants", "refusals", "bad_messages", "bad_requests", "links", "partitions", "host")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIME_SCALE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    NPUS_PER_SERVER_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    BAD_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    BAD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    time_scale: float
    uptime_s: float
    servers: int
    npus_per_server: int
    registered_clients: int
    requests: int
    grants: int
    refusals: int
    bad_messages: int
    bad_requests: int
    links: _containers.RepeatedCompositeFieldContainer[LinkStats]
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionInfo]
    host: HostStats
    def __init__(self, epoch: _Optional[str] = ..., time_scale: _Optional[float] = ..., uptime_s: _Optional[float] = ..., servers: _Optional[int] = ..., npus_per_server: _Optional[int] = ..., registered_clients: _Optional[int] = ..., requests: _Optional[int] = ..., grants: _Optional[int] = ..., refusals: _Optional[int] = ..., bad_messages: _Optional[int] = ..., bad_requests: _Optional[int] = ..., links: _Optional[_Iterable[_Union[LinkStats, _Mapping]]] = ..., partitions: _Optional[_Iterable[_Union[PartitionInfo, _Mapping]]] = ..., host: _Optional[_Union[HostStats, _Mapping]] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...
