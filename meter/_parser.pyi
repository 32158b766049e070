from collections.abc import Sequence

import pyarrow as pa

from meter.reasons import Reject

DEBUG: bool

class ParseResult:
    batch: pa.RecordBatch
    rejects: list[Reject]
    message_index: pa.Int32Array
    line_index: pa.Int32Array

def parse_batch(
    payloads: Sequence[bytes | bytearray | memoryview | None],
    now_ms: int | None = None,
    lateness_ms: int = ...,
) -> ParseResult: ...
