import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetLeaderRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResignRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResignResponse(_message.Message):
    __slots__ = ("identity",)
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    identity: str
    def __init__(self, identity: _Optional[str] = ...) -> None: ...

class Leadership(_message.Message):
    __slots__ = ("leader", "identity", "is_leader", "state", "valid_until", "fencing_token", "observed_at", "lease", "error", "ready", "revision", "app_health", "valid_for_ms")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNKNOWN: _ClassVar[Leadership.State]
        STATE_FOLLOWER: _ClassVar[Leadership.State]
        STATE_LEADER: _ClassVar[Leadership.State]
        STATE_NO_LEADER: _ClassVar[Leadership.State]
    STATE_UNKNOWN: Leadership.State
    STATE_FOLLOWER: Leadership.State
    STATE_LEADER: Leadership.State
    STATE_NO_LEADER: Leadership.State
    LEADER_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IS_LEADER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    APP_HEALTH_FIELD_NUMBER: _ClassVar[int]
    VALID_FOR_MS_FIELD_NUMBER: _ClassVar[int]
    leader: str
    identity: str
    is_leader: bool
    state: Leadership.State
    valid_until: _timestamp_pb2.Timestamp
    fencing_token: int
    observed_at: _timestamp_pb2.Timestamp
    lease: Lease
    error: str
    ready: bool
    revision: int
    app_health: str
    valid_for_ms: int
    def __init__(self, leader: _Optional[str] = ..., identity: _Optional[str] = ..., is_leader: _Optional[bool] = ..., state: _Optional[_Union[Leadership.State, str]] = ..., valid_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fencing_token: _Optional[int] = ..., observed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., error: _Optional[str] = ..., ready: _Optional[bool] = ..., revision: _Optional[int] = ..., app_health: _Optional[str] = ..., valid_for_ms: _Optional[int] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("name", "namespace", "transitions", "acquire_time", "renew_time", "duration_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RENEW_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    transitions: int
    acquire_time: _timestamp_pb2.Timestamp
    renew_time: _timestamp_pb2.Timestamp
    duration_seconds: int
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., transitions: _Optional[int] = ..., acquire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., renew_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_seconds: _Optional[int] = ...) -> None: ...

class GetShardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchShardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseShardRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: int
    def __init__(self, shard: _Optional[int] = ...) -> None: ...

class ReleaseShardResponse(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: int
    def __init__(self, shard: _Optional[int] = ...) -> None: ...

class ShardSet(_message.Message):
    __slots__ = ("shards", "identity", "owned", "members", "assignment", "desired", "observed_at", "error", "ready", "revision")
    class AssignmentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    class DesiredEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    OWNED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    shards: int
    identity: str
    owned: _containers.RepeatedCompositeFieldContainer[OwnedShard]
    members: _containers.RepeatedScalarFieldContainer[str]
    assignment: _containers.ScalarMap[int, str]
    desired: _containers.ScalarMap[int, str]
    observed_at: _timestamp_pb2.Timestamp
    error: str
    ready: bool
    revision: int
    def __init__(self, shards: _Optional[int] = ..., identity: _Optional[str] = ..., owned: _Optional[_Iterable[_Union[OwnedShard, _Mapping]]] = ..., members: _Optional[_Iterable[str]] = ..., assignment: _Optional[_Mapping[int, str]] = ..., desired: _Optional[_Mapping[int, str]] = ..., observed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., ready: _Optional[bool] = ..., revision: _Optional[int] = ...) -> None: ...

class OwnedShard(_message.Message):
    __slots__ = ("shard", "fencing_token", "valid_until", "valid_for_ms")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    VALID_FOR_MS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    fencing_token: int
    valid_until: _timestamp_pb2.Timestamp
    valid_for_ms: int
    def __init__(self, shard: _Optional[int] = ..., fencing_token: _Optional[int] = ..., valid_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_for_ms: _Optional[int] = ...) -> None: ...
