"""Kafka's default partitioner for keyed records (the Java client's; librdkafka's `murmur2_random`).

The worker does not partition by itself: its producer is configured with `partitioner=murmur2_random`, and
librdkafka computes this. The function is here so that the choice can be checked (tests do, against Kafka's
published vectors and against what librdkafka writes) and used by tools.
"""

_M = 0x5BD1E995


def murmur2(key: bytes) -> int:
    """Kafka's `Utils.murmur2`: MurmurHash2, seed 0x9747b28c, as a signed 32-bit int."""
    length = len(key)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    end = length - length % 4
    for i in range(0, end, 4):
        k = int.from_bytes(key[i:i + 4], "little")
        k = (k * _M) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * _M) & 0xFFFFFFFF
        h = ((h * _M) & 0xFFFFFFFF) ^ k
    rest = length % 4
    if rest == 3:
        h ^= key[end + 2] << 16
    if rest >= 2:
        h ^= key[end + 1] << 8
    if rest >= 1:
        h ^= key[end]
        h = (h * _M) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * _M) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition of `partitions` a keyed record goes to: toPositive(murmur2(key)) % partitions."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
