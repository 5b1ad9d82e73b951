"""The change stream: the staging change journal published to NATS JetStream, and read back.

:mod:`replicator.stream.wire` is the message format (version 1, documented in
docs/scale-out.md), :mod:`replicator.stream.nats` the small asyncio bridge both ends use,
:mod:`replicator.stream.sink` publishes the journal (cursor moved only after the PubAck), and
:mod:`replicator.stream.consumer` keeps a mirror from a durable pull consumer (stream sequence
committed with the data, ack after the commit).
"""
