from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SignRequest(_message.Message):
    __slots__ = ("audience", "ttl_seconds", "claims_json", "bind_certificate", "subject", "certificate_thumbprint")
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_JSON_FIELD_NUMBER: _ClassVar[int]
    BIND_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    audience: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    claims_json: str
    bind_certificate: bool
    subject: str
    certificate_thumbprint: str
    def __init__(self, audience: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., claims_json: _Optional[str] = ..., bind_certificate: _Optional[bool] = ..., subject: _Optional[str] = ..., certificate_thumbprint: _Optional[str] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("token", "kid", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    kid: str
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., kid: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("token", "audience", "expected_subject", "certificate_thumbprint", "require_binding")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_BINDING_FIELD_NUMBER: _ClassVar[int]
    token: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    expected_subject: str
    certificate_thumbprint: str
    require_binding: bool
    def __init__(self, token: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ..., expected_subject: _Optional[str] = ..., certificate_thumbprint: _Optional[str] = ..., require_binding: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("claims_json", "kid", "subject", "expires_at", "key_valid_until")
    CLAIMS_JSON_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    KEY_VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    claims_json: str
    kid: str
    subject: str
    expires_at: int
    key_valid_until: int
    def __init__(self, claims_json: _Optional[str] = ..., kid: _Optional[str] = ..., subject: _Optional[str] = ..., expires_at: _Optional[int] = ..., key_valid_until: _Optional[int] = ...) -> None: ...

class GetJWKSRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchKeysRequest(_message.Message):
    __slots__ = ("after_sequence",)
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    def __init__(self, after_sequence: _Optional[int] = ...) -> None: ...

class JWKS(_message.Message):
    __slots__ = ("jwks_json", "sequence", "max_ttl_seconds", "clock_skew_seconds")
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    jwks_json: str
    sequence: int
    max_ttl_seconds: int
    clock_skew_seconds: int
    def __init__(self, jwks_json: _Optional[str] = ..., sequence: _Optional[int] = ..., max_ttl_seconds: _Optional[int] = ..., clock_skew_seconds: _Optional[int] = ...) -> None: ...

class RotateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateResponse(_message.Message):
    __slots__ = ("prepared_kid", "active_kid")
    PREPARED_KID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_KID_FIELD_NUMBER: _ClassVar[int]
    prepared_kid: str
    active_kid: str
    def __init__(self, prepared_kid: _Optional[str] = ..., active_kid: _Optional[str] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("kid",)
    KID_FIELD_NUMBER: _ClassVar[int]
    kid: str
    def __init__(self, kid: _Optional[str] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("revoked_kid", "active_kid")
    REVOKED_KID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_KID_FIELD_NUMBER: _ClassVar[int]
    revoked_kid: str
    active_kid: str
    def __init__(self, revoked_kid: _Optional[str] = ..., active_kid: _Optional[str] = ...) -> None: ...
