from collections.abc import Sequence

CODES: tuple[str, ...]
HEADERS: tuple[str, ...]
SHANI: bool
DEBUG: bool

def select_backend(shani: bool) -> bool: ...
def sha256(data: bytes) -> bytes: ...
def hmac_sha256(key: bytes, data: bytes) -> bytes: ...
def enable_message_headers(
    message_type: object, header_get_all: int, first: object, second: object
) -> bool: ...
def message_headers_in_place() -> bool: ...

class Verdicts:
    codes: bytes
    args: bytes
    slots: bytes
    def __init__(self, codes: bytes, args: bytes, slots: bytes) -> None: ...

class Table:
    def __init__(
        self,
        kids: Sequence[bytes],
        algs: Sequence[int],
        windows: Sequence[tuple[int, int, int]],
        secrets: Sequence[bytes | None],
        topics: Sequence[frozenset[str] | None],
    ) -> None: ...
    def __len__(self) -> int: ...
    def slot(self, kid: bytes) -> int: ...
    def check(
        self,
        payloads: Sequence[bytes | None],
        headers: Sequence[object],
        timestamps: Sequence[tuple[int, int]],
        topic: str,
        arrival_ms: int,
        allow_create_time: bool,
        max_delay_ms: int,
        max_future_ms: int,
    ) -> Verdicts: ...
