"""meter: validated, priced, exactly-once token metering from Kafka to a Parquet lake."""

from meter._version import __version__
from meter.parser import parse_batch
from meter.reasons import Reject

__all__ = ["Reject", "__version__", "parse_batch"]
