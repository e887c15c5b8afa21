"""nexedge.serve: the line daemon and its clients.

daemon (entry point ``nexedge-daemon``), config, protocol, ingest, decode, batcher,
worker, decide, metrics, sampler, outbox, notify, logjson; client (camera client
library), camerasim + cli (``nexedge camera-sim``); monitor, pullserver, auth.
Python 3.8, no torch.
"""
